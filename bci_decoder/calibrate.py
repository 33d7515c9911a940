"""Unit identification: adapt a pretrained model to a new session in seconds.

Only the new session's unit embeddings (and its session embedding) are fitted; every
other weight is frozen, so what the model learned across sessions carries over and a
short labelled block suffices.

The mean of the new unit embeddings is held at its initial value (the mean of the
pretrained units); only their offsets from it are fitted. The encoder sums the embeddings
of a group's spikes (the count path), so a shift shared by all units moves that sum by
(spikes per group) x (shift): ~200x on a dense Utah-array session such as jango_20160711
(3,700 spikes/s), where Adam's common-mode steps threw the latents off their trained range
and the fit sat at R² ~0.05 even on the training seconds. Only the differences between
units carry identity; holding their mean took that session from R² 0.06 to 0.82 (60 s)
and a dense simulated session from 0.15 to 0.5-0.7, and leaves sparse sessions unchanged.

How close to the model's own ceiling this gets: a pretraining session recalibrated from
scratch as if new (fresh unit and session rows, 60 s) scores what the pretrained rows
score on its test part (chewie_20131219 0.705 vs 0.689, jango_20160626 0.804 vs 0.828 with
models/poyo-mp-small-loso3), so on such sessions better figures have to come from the
pretrained model, not from this fit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.func import functional_call
from tqdm import tqdm

from bci_decoder.config import SamplerSettings
from bci_decoder.data.session import Session, time_split
from bci_decoder.decode import CAUSAL_KEYS, decode_causal, session_tokens, to_torch
from bci_decoder.metrics import r2_score
from bci_decoder.model.vocab import unit_key
from bci_decoder.subjects import (
    WarmStart,
    WarmStartMode,
    plan_warm_start,
    subject_sessions,
    unit_rates_hz,
)
from bci_decoder.train.checkpoint import Decoder, Normalizer
from bci_decoder.train.data import BatchSampler, SessionSource
from bci_decoder.train.loop import masked_mse

# fit_units may run in several threads at once (the REST job scores and refits side by
# side); the global torch RNG draws the new embeddings' start, so seeding and drawing
# must not interleave
_SEED_LOCK = threading.Lock()


@dataclass
class CalibrationSettings:
    """How ``fit_units`` optimises. The defaults were chosen on the leave-sessions-out
    study (benchmarks/unit_identification.py); see the module docstring."""

    steps: int = 150
    lr: float = 3e-2  # Adam; linear warm-up, then cosine decay to ``lr_floor`` x lr
    lr_floor: float = 0.05
    # Fraction of the steps spent warming up. Full-size first steps (each moves an
    # embedding coordinate by about the spread of the pretrained table) left some runs on
    # a plateau: simulated session, 30 s, seeds 1/2: R² 0.50/0.68 without, 0.71/0.71 with.
    warmup: float = 0.15
    session_lr: float | None = None  # None: ``lr``
    batch_size: int = 8  # sequences per step, at most (see ``spike_budget``)
    sequence: float = 1.5  # s of latent groups per training sequence
    burn_in: float = 0.5  # s at a sequence's start that build history but carry no loss
    max_queries: int = 8  # behaviour samples scored per sequence
    # Spike tokens per step, about: dense sessions get fewer sequences per step so that a
    # 60 s calibration stays well under a minute on one thread (the cost of a step grows
    # with spikes x (groups + queries)); sparse sessions get ``batch_size``.
    spike_budget: int = 32_000
    unit_dropout: float = 0.0  # probability that a sequence drops units (augmentation)
    threads: int = 0  # 0: torch's default
    seed: int = 0
    # A new day of a subject the model knows starts each unit from the same channel on the
    # most recent earlier day ("name"), also requiring a firing rate within 2x
    # ("name+rate"), or from the mean of all units as for an unknown subject ("off");
    # see bci_decoder/subjects.py
    warm_start: WarmStartMode = "name"


class NewRows:
    """What a calibration fits: the new units' offsets from their (fixed) mean, and the new
    session's row. The model runs on tables assembled from its frozen old rows and these
    (``functional_call`` with :meth:`tables`), so no gradient or optimiser state ever
    touches a pretrained row; :meth:`write_back` stores the result in the model."""

    def __init__(
        self, model: torch.nn.Module, first_unit: int, first_session: int, fit_session: bool = True
    ) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        unit_table = model.unit_emb.weight.detach()  # (N_units, D)
        session_table = model.session_emb.weight.detach()  # (N_sessions, D)
        self.model = model
        self.old_units = unit_table[:first_unit]
        self.mean = unit_table[first_unit:].mean(0)  # (D,) held fixed: see the module doc
        self.offsets = (unit_table[first_unit:] - self.mean).clone().requires_grad_(True)
        self.old_sessions = session_table[:first_session]
        self.session = session_table[first_session:].clone().requires_grad_(fit_session)

    def tables(self) -> dict[str, torch.Tensor]:
        return {
            "unit_emb.weight": torch.cat([self.old_units, self.mean + self.offsets]),
            "session_emb.weight": torch.cat([self.old_sessions, self.session]),
        }

    def center(self) -> None:
        """Project back to zero-mean offsets after a step rather than centring the
        gradient: Adam then sees the common-mode gradient in its second moment, which damps
        the differential steps of dense sessions (centred gradients: jango 60 s R² 0.69-0.80
        depending on lr, projection: 0.82)."""
        with torch.no_grad():
            self.offsets -= self.offsets.mean(0)

    def write_back(self) -> None:
        with torch.no_grad():
            final = self.tables()
            self.model.unit_emb.weight.copy_(final["unit_emb.weight"])
            self.model.session_emb.weight.copy_(final["session_emb.weight"])
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model.eval()


def lr_factor(step: int, steps: int, warmup: float, floor: float) -> float:
    """A calibration's learning-rate factor: linear warm-up over ``warmup`` x steps, then
    cosine decay to ``floor``."""
    warm = min(1.0, (step + 1) / max(1.0, warmup * steps))
    return warm * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * step / steps)))


def plan_for(
    decoder: Decoder, session: Session, mode: WarmStartMode, span: tuple[float, float] | None
) -> WarmStart | None:
    """The warm start of ``session`` on ``decoder`` (None: unknown subject or mode off);
    rates for ``"name+rate"`` come from the session's spikes in ``span``."""
    rates = None
    if mode == "name+rate" and span is not None:
        rates = unit_rates_hz(session.spike_times, session.spike_units, session.num_units, span)
    return plan_warm_start(
        decoder.units.to_list(),
        decoder.sessions.to_list(),
        decoder.info,
        session.subject,
        session.unit_ids,
        recorded_at=session.recorded_at,
        mode=mode,
        unit_rates=rates,
    )


def add_session(
    decoder: Decoder,
    session: Session,
    output: str,
    norm: Normalizer,
    warm: WarmStart | None = None,
) -> Decoder:
    """A copy of ``decoder`` that knows ``session``'s units and the session itself.

    New unit embeddings start near the mean of the known ones; with ``warm``, the units
    it matched start as copies of their rows on an earlier day of the subject, and the
    session embedding as a copy of the nearest earlier day's."""
    if output not in decoder.model.output_names:
        raise ValueError(
            f"the model has no head for {output!r}; it decodes {decoder.model.output_names}"
        )
    dec = decoder.clone()
    sid = session.session_id
    keys = [unit_key(sid, u) for u in session.unit_ids]
    added = dec.units.extend(keys)
    dec.model.extend_units(len(added))
    if sid not in dec.sessions:
        dec.sessions.extend([sid])
        dec.model.extend_sessions(1)
    if warm is not None and added:
        rows = dec.units.session_units(sid, session.unit_ids)  # (U,)
        hit = warm.unit_rows >= 0
        with torch.no_grad():
            table = dec.model.unit_emb.weight
            table[torch.from_numpy(rows[hit])] = table[torch.from_numpy(warm.unit_rows[hit])]
            if warm.session_row >= 0:
                stable = dec.model.session_emb.weight
                stable[dec.sessions[sid]] = stable[warm.session_row]
        dec.info = dict(dec.info) | {"warm_start": warm.summary()}
    dec.norms[sid] = {output: norm}
    return dec


def fit_units(
    decoder: Decoder,
    session: Session,
    output: str,
    span: tuple[float, float],
    settings: CalibrationSettings | None = None,
    progress: Callable[[int, float], None] | None = None,
    show_bar: bool = False,
    start: Decoder | None = None,
) -> Decoder:
    """Calibrate ``session`` on the behaviour in ``span``; returns a new Decoder.

    Only the new units' embeddings and the new session's embedding are fitted; every
    other row and weight of the returned model is bit-identical to ``decoder``'s.
    ``start``: a fit of ``session`` on ``decoder`` (e.g. on part of the block) whose unit
    and session rows the fit starts from, instead of the mean / warm start.
    """
    st = settings or CalibrationSettings()
    if st.threads:
        torch.set_num_threads(st.threads)
    beh = session.behavior[output].between(*span)
    if len(beh.timestamps) < 10:
        raise ValueError(f"only {len(beh.timestamps)} behaviour samples in the calibration span")
    if span[1] - span[0] <= st.sequence + 0.5:
        raise ValueError(
            f"calibration span {span[1] - span[0]:.1f} s is too short (need > {st.sequence + 0.5} s)"
        )
    norm = Normalizer.fit(beh.data)
    sid = session.session_id
    if start is not None:
        if sid not in start.sessions or len(start.units) < len(decoder.units):
            raise ValueError("start must be a calibration of this session on this decoder")
        dec = start.clone()
        dec.norms = dict(dec.norms) | {sid: {output: norm}}
    else:
        warm = plan_for(decoder, session, st.warm_start, span)
        with _SEED_LOCK:  # the new rows' random start: the same whichever thread fits
            torch.manual_seed(st.seed)
            dec = add_session(decoder, session, output, norm, warm)
    model = dec.model
    first_unit, first_session = len(decoder.units), len(decoder.sessions)
    rows = NewRows(model, first_unit, first_session)
    opt = torch.optim.Adam(
        [
            {"params": [rows.offsets], "lr": st.lr},
            {"params": [rows.session], "lr": st.lr if st.session_lr is None else st.session_lr},
        ]
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    sampler = _block_sampler(dec, session, output, span, st)
    model.train()
    for step in tqdm(range(st.steps), desc="calibrate", disable=not show_bar, dynamic_ncols=True):
        _, batch = sampler.batch(step)
        pred = functional_call(
            model, rows.tables(), args=(), kwargs={"mode": "causal", **to_torch(batch, CAUSAL_KEYS)}
        )
        loss = masked_mse(
            pred, torch.from_numpy(batch["target"]), torch.from_numpy(batch["target_mask"])
        )
        factor = lr_factor(step, st.steps, st.warmup, st.lr_floor)
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * factor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows.center()
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    rows.write_back()
    dec.info = dict(dec.info) | {
        "calibrated": {"session": sid, "span": list(span), "steps": st.steps}
    }
    return dec


@dataclass
class SecondStage:
    """The second stage of ``adapt``: the network's shared weights fine-tuned to the new
    session on top of its identified units (POYO's recipe of unit identification, then
    full fine-tuning), stopped early on the calibration block's held-out slice.

    Unit and session embeddings stay as unit identification left them: only the shared
    weights move, at a small learning rate, so a minute of data nudges the network
    rather than re-learning it."""

    steps: int = 80
    lr: float = 2e-4
    eval_every: int = 20
    holdout: float = 0.2  # last fraction of the block that decides (and stops early)
    min_gain: float = 0.01  # R² on the slice the second stage must add to be kept
    weight_decay: float = 0.0
    # A new day of a known subject: fit unit identification from the earlier day's rows
    # (warm) and from the mean (cold) on the first 80% and keep the start that scores
    # better on the slice. Warm lost 0.11 on jango_20160711 (across_days.json), but on the
    # 7 later Spike days the choice scored 0.661 against warm alone 0.672
    # (across_days_s2.json): 12 s of slice cannot tell fits 0.01-0.06 apart. Off by default.
    choose_start: bool = False
    # The whole block's unit identification (step 3 of ``adapt``): 0 fits it from the
    # mean / warm start with ``CalibrationSettings.steps``; n > 0 continues from the rows
    # the first 80% found for n steps at ``refit_lr`` x lr (warm-up ``refit_warmup``).
    # Held-out sessions of poyo-mp-transfer-s2, 60 s, one thread (R² on the last 30%, CPU s
    # of adapt), today's refit vs n=40 vs n=60: jango_20160711 0.729/0.843/0.855 (60/45/48 s),
    # chewie_20131003 0.559/0.529/0.537 (60/44/45), mihi_20140303 0.723/0.707/0.702
    # (48/37/39), spike_20120904 0.721/0.770/0.775 (149/102/107), spike_20121017
    # 0.773/0.752/0.757 (230/179/182): mean 0.701/0.720/0.725, but drops of 0.02-0.03 on
    # three sessions, so it stayed off. Once the bucketed encoder (POYO.encode_rows) had
    # made the Spike days' steps 4x cheaper, the old default still took 57-73 CPU s on
    # these five and n=40 took 42-55 s (all under issue 8's 60 s on one thread), mean
    # +0.019, worst -0.030 (chewie), within the default's seed-to-seed spread (up to
    # 0.043): benchmarks/results/calibration_cost.txt. On by default since.
    refit_steps: int = 40
    refit_lr: float = 1.0 / 3.0
    refit_warmup: float = 0.1
    # The last stage: a session readout (model.session_readout, a GRU over the calibrated
    # model's features) of each size in readout_hidden, fitted on the first 80% and kept
    # where the best beats the linear head on the slice by readout_min_gain. Held-out
    # sessions of poyo-mp-transfer, 60 s, unit identification alone vs + readout (32 /
    # 128 units, R² on the last 30%): jango_20160711 0.731 -> 0.853 / 0.820,
    # chewie_20131003 0.534 -> 0.556 / 0.561, mihi 0.714 -> 0.729 / 0.743; on
    # spike_20120904 and spike_20121017 the slice kept neither. Fitting both sizes, the
    # slice chose 128 on 7 of the 10 held-out sessions and cost 3-30 s of one core. One
    # size, at most readout_epochs epochs of 256 windows (fit_block_readout): a 60 s
    # calibration of jango_20160711 48.7 CPU s (R² 0.882; 35.5 s and 0.843 without the
    # readout, 67.4 s and 0.900 at 512 windows an epoch), mihi 57.0 s (0.755; 48.9 s and
    # 0.707 without), spike_20120904 47.8 s at 512 (0.770, not kept; 35.6 s without):
    # benchmarks/results/calibration_cost_readout.txt.
    readout: bool = True
    readout_hidden: tuple[int, ...] = (128,)
    readout_min_gain: float = 0.005
    readout_epochs: int = 25
    # the readout also reads each unit's spike count in the group (session_readout's
    # counts; they win on the real sessions' 30-45 min of training). Off here: held-out
    # sessions of poyo-mp-transfer, 60 s, readout of features vs features + counts
    # (test R², whether the slice kept it): jango_20160711 0.884 (kept) / 0.873 (kept),
    # mihi 0.745 (kept) / 0.742, chewie_20131003 0.589 / 0.550, spike_20120904 0.741 /
    # 0.787, spike_20120905 0.737 / 0.795 (neither kept on the Spike days): the slice
    # would have kept counts on jango alone, where they lose.
    readout_counts: bool = False


def fine_tune(
    dec: Decoder,
    session: Session,
    output: str,
    span: tuple[float, float],
    settings: CalibrationSettings,
    stage: SecondStage,
    steps: int,
    eval_span: tuple[float, float] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Decoder, list[tuple[int, float]]]:
    """Fine-tune ``dec`` (which already knows ``session``) on ``span`` for ``steps``
    steps; with ``eval_span``, also score it every ``stage.eval_every`` steps and return
    the best of those models with the curve [(step, R²)] (step 0 = the input model).
    ``progress(step, loss)`` after each step, as ``fit_units``'s."""
    dec = dec.clone()
    model = dec.model
    trainable = [
        p for n, p in model.named_parameters() if n not in ("unit_emb.weight", "session_emb.weight")
    ]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in ("unit_emb.weight", "session_emb.weight"))
    opt = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay)
    sampler = _block_sampler(dec, session, output, span, settings)
    curve: list[tuple[int, float]] = []
    best: tuple[float, dict | None] = (-np.inf, None)
    if eval_span is not None:
        r = score_span(dec, session, output, eval_span)
        curve.append((0, r))
        best = (r, None)  # None: the input model itself
    for step in range(steps):
        model.train()
        _, batch = sampler.batch(10_000 + step)  # other sequences than unit identification's
        pred = model(mode="causal", **to_torch(batch, CAUSAL_KEYS))
        loss = masked_mse(
            pred, torch.from_numpy(batch["target"]), torch.from_numpy(batch["target_mask"])
        )
        warm = min(1.0, (step + 1) / 10)
        for g in opt.param_groups:
            g["lr"] = stage.lr * warm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if progress is not None:
            progress(step + 1, float(loss.detach()))
        if eval_span is not None and (step + 1) % stage.eval_every == 0:
            model.eval()
            r = score_span(dec, session, output, eval_span)
            curve.append((step + 1, r))
            if r > best[0]:
                best = (r, {k: v.detach().clone() for k, v in model.state_dict().items()})
    for p in model.parameters():
        p.requires_grad_(True)
    if eval_span is not None and best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    return dec, curve


def adapt(
    decoder: Decoder,
    session: Session,
    output: str,
    span: tuple[float, float],
    settings: CalibrationSettings | None = None,
    stage: SecondStage | None = None,
    progress: Callable[[str], None] | None = None,
    steps: Callable[[str, int, int, float], None] | None = None,
    parallel: bool = False,
    refit: bool = True,
) -> tuple[Decoder, dict[str, Any]]:
    """Few-shot adaptation that uses what the block offers.

    1. Unit identification on the block's first 80%; its R² on the last 20% is the bar.
       With ``SecondStage.choose_start``, a new day of a known subject is fitted from the
       earlier day's rows and from the mean, and the start that scores better on the
       slice is kept.
    2. The second stage (``SecondStage``) from there, scored on the same 20% as it goes.
    3. If the second stage beat the bar by ``min_gain``, the returned model is unit
       identification on the whole block followed by the second stage for the number of
       steps that scored best; otherwise unit identification on the whole block alone.
       With ``SecondStage.refit_steps`` > 0 that whole-block fit continues from the first
       80%'s rows for those steps instead of starting over (with ``parallel``, it then
       runs after steps 1-2, not beside them).

    ``progress(message)`` at each phase; ``steps(fit, step, total, loss)`` after each
    optimisation step of each fit ("holdout", "second_stage", "all", "second_stage_all").
    ``parallel``: the whole block's unit identification runs in a second thread beside
    steps 1-2 (it does not depend on them; each fit is bit-identical to running it alone),
    so on two cores the whole takes about steps 1-2 plus the final second stage: the REST
    calibration job. ``refit=False``: the fits on the first 80% are returned as they are
    (unit identification, and the second stage's best step where it was kept).

    Returns the model and a report of the choice (slice R² of each stage, the curve)."""
    st = settings or CalibrationSettings()
    stage = stage or SecondStage()
    say = progress or (lambda _msg: None)

    def counter(fit: str, total: int) -> Callable[[int, float], None] | None:
        if steps is None:
            return None
        return lambda step, loss: steps(fit, step, total, loss)

    cut = span[0] + (1.0 - stage.holdout) * (span[1] - span[0])
    report: dict[str, Any] = {"second_stage": False}
    held = cut - span[0] > st.sequence + 0.5 and span[1] - cut >= 2.0
    pool = (
        ThreadPoolExecutor(1, thread_name_prefix="adapt") if held and parallel and refit else None
    )
    whole, whole_st = None, st
    try:
        if pool is not None and stage.refit_steps <= 0:
            say("unit identification on the whole block, beside the slice's fits")
            whole = pool.submit(fit_units, decoder, session, output, span, st,
                                counter("all", st.steps))  # fmt: skip
        if held:
            first, tuned, st = _choose_stage(
                decoder, session, output, (span[0], cut, span[1]), st, stage, report, say, counter
            )
        else:
            report["reason"] = "block too short to hold a slice out: unit identification only"
        if held and not refit:
            dec = tuned if report["second_stage"] else first
        else:
            dec = whole.result() if whole is not None else None
            if held and stage.refit_steps > 0:
                say("unit identification on the whole block, from the first 80%'s rows")
                more = replace(st, steps=stage.refit_steps, lr=st.lr * stage.refit_lr,
                               warmup=stage.refit_warmup)  # fmt: skip
                if st.session_lr is not None:
                    more.session_lr = st.session_lr * stage.refit_lr
                dec = fit_units(decoder, session, output, span, more,
                                counter("all", more.steps), start=first)  # fmt: skip
            elif dec is None or st is not whole_st:  # (a cold start won: refit from the mean)
                say("unit identification on the whole block")
                dec = fit_units(decoder, session, output, span, st, counter("all", st.steps))
            if report["second_stage"]:
                say("second stage on the whole block")
                n = report["second_stage_steps"]
                dec, _ = fine_tune(dec, session, output, span, st, stage, n,
                                   progress=counter("second_stage_all", n))  # fmt: skip
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    if held and stage.readout:
        from bci_decoder.train.session_readout_fit import fit_block_readout

        say("session readout, fitted on the first 80% and scored on the last 20%")
        readout, rep = fit_block_readout(
            dec, session, output, (span[0], cut, span[1]), stage.readout_hidden,
            stage.readout_min_gain, st.threads, stage.readout_epochs,
            counts=stage.readout_counts,
        )  # fmt: skip
        report["readout"] = readout is not None
        report["readout_report"] = rep
        dec = dec if dec is not decoder else dec.clone()
        dec.readouts = dict(dec.readouts)
        if readout is not None:
            dec.readouts[(session.session_id, output)] = readout
        else:  # a readout of an earlier calibration of this session would be stale
            dec.readouts.pop((session.session_id, output), None)
    dec.info = dict(dec.info) | {"adapt": {k: v for k, v in report.items() if k != "curve"}}
    return dec, report


def _choose_stage(
    decoder: Decoder,
    session: Session,
    output: str,
    cuts: tuple[float, float, float],
    st: CalibrationSettings,
    stage: SecondStage,
    report: dict[str, Any],
    say: Callable[[str], None],
    counter: Callable[[str, int], Callable[[int, float], None] | None],
) -> tuple[Decoder, Decoder, CalibrationSettings]:
    """``adapt``'s steps 1-2 on the block (lo, cut, hi): the fits on [lo, cut), scored on
    [cut, hi); fills ``report``. Returns unit identification, the second stage's best
    model, and the settings of the start that won."""
    lo, cut, hi = cuts
    say("unit identification on the first 80%")
    first = fit_units(decoder, session, output, (lo, cut), st, counter("holdout", st.steps))
    warm = st.warm_start != "off" and plan_for(decoder, session, st.warm_start, (lo, hi))
    if stage.choose_start and warm:
        say("unit identification from the mean (cold start) on the first 80%")
        cold_st = replace(st, warm_start="off")
        cold = fit_units(decoder, session, output, (lo, cut), cold_st)
        r_warm = score_span(first, session, output, (cut, hi))
        r_cold = score_span(cold, session, output, (cut, hi))
        report |= {"slice_r2_warm": r_warm, "slice_r2_cold": r_cold}
        if r_cold > r_warm:
            first, st = cold, cold_st
    report["start"] = "warm" if warm and st.warm_start != "off" else "cold"
    say("second stage, scored on the last 20%")
    tuned, curve = fine_tune(first, session, output, (lo, cut), st, stage, stage.steps,
                             (cut, hi), counter("second_stage", stage.steps))  # fmt: skip
    bar = curve[0][1]
    best_step, best_r2 = max(curve[1:] or curve, key=lambda c: c[1])
    report |= {
        "slice_r2_unit_identification": bar,
        "slice_r2_second_stage": best_r2,
        "second_stage_steps": best_step,
        "curve": curve,
        "second_stage": best_r2 > bar + stage.min_gain,
    }
    return first, tuned, st


def zero_shot(
    decoder: Decoder,
    session: Session,
    output: str,
    mode: WarmStartMode = "name",
    rate_span: tuple[float, float] | None = None,
) -> Decoder:
    """A new day of a known subject decoded with no labels and no fitting: the
    warm-started tables (``subjects.plan_warm_start``) and the behaviour normalisation of
    the nearest earlier day. ``rate_span``: spikes that ``"name+rate"`` may look at."""
    warm = plan_for(decoder, session, mode, rate_span)
    if warm is None:
        raise ValueError(
            f"zero-shot decoding needs a subject the model knows: {session.subject!r} is not "
            "among its pretraining sessions' subjects (or warm_start is off); calibrate with "
            "labelled seconds instead"
        )
    norm = nearest_day_norm(decoder, session, warm, output)
    if norm is None:
        raise ValueError(f"no day of {session.subject!r} in the model decodes {output!r}")
    dec = add_session(decoder, session, output, norm, warm)
    dec.model.eval()
    dec.info = dict(dec.info) | {
        "calibrated": {"session": session.session_id, "span": [], "steps": 0, "zero_shot": True}
    }
    return dec


def nearest_day_norm(
    decoder: Decoder, session: Session, warm: WarmStart, output: str
) -> Normalizer | None:
    """The behaviour normalisation of ``output`` on the nearest earlier day of the
    session's subject that decodes it (None if no day does): what a new day without labels
    maps z-scores back with."""
    norm = decoder.norms.get(warm.nearest_session, {}).get(output)
    if norm is not None:
        return norm
    days = [
        sid
        for sid in subject_sessions(decoder.info, session.subject, session.recorded_at)
        if output in decoder.norms.get(sid, {})
    ]
    if not days:
        return None
    warm.notes.append(f"normalisation of {output} from {days[0]}")
    return decoder.norms[days[0]][output]


def _block_sampler(
    dec: Decoder, session: Session, output: str, span: tuple[float, float], st: CalibrationSettings
) -> BatchSampler:
    """Causal training sequences from ``span`` of a session ``dec`` already knows."""
    sid = session.session_id
    src = SessionSource(
        session=session,
        session_index=dec.sessions[sid],
        unit_index=dec.units.session_units(sid, session.unit_ids),
        output=output,
        output_index=dec.output_index(output),
        norm=dec.norms[sid][output],
        span=span,
    )
    return BatchSampler(
        [src],
        dec.config.latent_step,
        dec.config.context,
        SamplerSettings(
            batch_size=_batch_size(session, span, dec.config.latent_step, st),
            sequence=st.sequence,
            burn_in=st.burn_in,
            max_queries=st.max_queries,
            window_fraction=0.0,
            unit_dropout=st.unit_dropout,
        ),
        seed=st.seed,
        modes=("causal",),
    )


def _batch_size(
    session: Session, span: tuple[float, float], step: float, st: CalibrationSettings
) -> int:
    """Sequences per step: ``batch_size``, fewer where spikes are dense (``spike_budget``)."""
    lo, hi = np.searchsorted(session.spike_times, span)
    per_group = (hi - lo) / max(span[1] - span[0], 1e-9) * step
    tokens = per_group * (st.sequence / step + st.max_queries)  # one sequence's spike slots
    return int(np.clip(st.spike_budget // max(tokens, 1.0), 2, st.batch_size))


def score_span(decoder: Decoder, session: Session, output: str, span: tuple[float, float]) -> float:
    """Causal-mode R² of the behaviour samples in ``span`` (through the streaming engine
    where the session has a recurrent readout, which the torch reference does not read)."""
    if (session.session_id, output) in decoder.readouts:
        from bci_decoder.decode import decode_session

        _, target, pred = decode_session(decoder, session, output, span)
        return r2_score(target, pred)
    times, units, sidx = session_tokens(decoder, session)
    beh = session.behavior[output].between(*span)
    z = decode_causal(decoder, times, units, sidx, output, beh.timestamps)
    return r2_score(beh.data, decoder.norms[session.session_id][output].inverse(z))


def calibrate_report(
    decoder: Decoder,
    session: Session,
    seconds: float = 60.0,
    output: str | None = None,
    steps: int = 150,
    baselines: bool = True,
    settings: CalibrationSettings | None = None,
    second_stage: bool = True,
) -> tuple[dict[str, Any], Decoder]:
    """The ``calibrate`` command: fit on the first ``seconds`` of the training part, score
    the last 30%, next to Wiener and GRU fitted on the same seconds and on the full 70%.
    ``second_stage``: ``adapt`` (unit identification, then a fine-tune where the block's
    held-out slice says it helps) instead of unit identification alone."""
    output = output or session.default_output()
    if output not in session.behavior:
        raise ValueError(f"the session has no behaviour {output!r}: {list(session.behavior)}")
    split = time_split(session)
    start = split.fit[0]
    stop = min(start + seconds, split.fit[1])
    st = settings or CalibrationSettings(steps=steps)
    t0 = time.perf_counter()
    if seconds <= 0:  # zero-shot: the rates of the first minute's spikes (no labels) only
        dec = zero_shot(decoder, session, output, st.warm_start, (start, start + 60.0))
    elif second_stage:
        dec, _ = adapt(decoder, session, output, (start, stop), st, progress=print)
    else:
        dec = fit_units(decoder, session, output, (start, stop), st, show_bar=True)
    wall = time.perf_counter() - t0
    report: dict[str, Any] = {
        "session": session.session_id,
        "seconds": max(stop - start, 0.0),
        "output": output,
        "r2": score_span(dec, session, output, split.test),
        "wall_s": wall,
        "warm_start": dec.info.get("warm_start"),
        "adapt": dec.info.get("adapt"),
    }
    if baselines:
        from bci_decoder.baselines import evaluate_baselines

        full = evaluate_baselines(session, output, split.fit, split.test, ("wiener", "gru"))
        report |= {"wiener_full": full["wiener"]["r2"], "gru_full": full["gru"]["r2"]}
        if seconds > 0:
            same = evaluate_baselines(session, output, (start, stop), split.test, ("wiener", "gru"))
            report |= {
                "wiener_same_seconds": same["wiener"]["r2"],
                "gru_same_seconds": same["gru"]["r2"],
            }
    return report, dec
