"""Label-free calibration: a new session's unit embeddings fitted from its spiking alone.

The masked objective (MtM) scores how well the model reconstructs hidden spiking of the
new session; only the new units' embeddings (and the new session's embedding) are fitted
to it, every other weight frozen. Behaviour is then read out by the pretrained head of the
matching output kind, through the same unit table: no behaviour sample is ever used.

As in the supervised ``calibrate.fit_units``, the mean of the new unit embeddings is held
at its start (the mean of the pretrained units) and only their offsets are fitted: the
encoder sums a group's unit embeddings (the count path), so a common shift would move
the latents off their trained range by (spikes per group) x (shift) on dense sessions.

Without labels there is no behaviour normaliser of the session's own: decoded z-scores
are mapped back with the mean of the pretrained sessions' normalisers of that output
(their means and standard deviations averaged), which is what a rig has before its first
cued movement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import functional_call
from tqdm import tqdm

from bci_decoder.calibrate import (
    _SEED_LOCK,
    NewRows,
    add_session,
    lr_factor,
    nearest_day_norm,
    plan_for,
    score_span,
)
from bci_decoder.config import MtMSettings
from bci_decoder.data.session import Session, time_split
from bci_decoder.decode import to_torch
from bci_decoder.model.masking import MTM_KEYS, SCHEMES
from bci_decoder.subjects import WarmStartMode
from bci_decoder.train.checkpoint import Decoder, Normalizer
from bci_decoder.train.data import MtMSampler, MtMSource
from bci_decoder.train.objectives import masked_poisson_nll


@dataclass
class UnsupervisedSettings:
    """How ``fit_units_unsupervised`` optimises (Adam, warm-up then cosine, as fit_units)."""

    steps: int = 150
    lr: float = 3e-2
    lr_floor: float = 0.05
    warmup: float = 0.15
    session_lr: float | None = None  # None: ``lr``
    fit_session: bool = True  # also fit the new session's embedding (else: the mean row)
    batch_size: int = 8  # masked windows per step
    window: float | None = None  # s; None: the model's context
    bin_width: float | None = None  # s; None: the bins the model's MtM head learned on
    schemes: dict[str, float] = field(default_factory=lambda: {s: 1.0 for s in SCHEMES})
    mask_ratio: float = 0.3
    forward_s: float = 0.2
    output: str | None = None  # head read out; None: the session's own kind if it has
    # behaviour the model decodes, else the model's first output
    threads: int = 0
    seed: int = 0
    # a new day of a subject the model knows starts from the earlier day's rows and decodes
    # with that day's behaviour normalisation (as ``calibrate.zero_shot``); "off": the mean
    warm_start: WarmStartMode = "name"
    # learning rate when the rows start warm: a refinement of rows that already decode,
    # not a search. spike_20120904 (runs/poyo-mp-transfer-s2 + a causal MtM head, 60 s of
    # spikes): R² -2.82 at 3e-2, 0.09 at 3e-3, 0.51 at 1e-3, 0.55 at 5e-4, 0.46 at 2e-4
    # (zero-shot 0.26, supervised unit identification 0.72); None: ``lr``
    warm_lr: float | None = 5e-4


def unlabelled_norm(decoder: Decoder, output: str) -> Normalizer:
    """The mean of the pretrained sessions' normalisers of ``output``."""
    norms = [d[output] for d in decoder.norms.values() if output in d]
    if not norms:
        raise ValueError(f"no pretrained session has a normaliser for {output!r}")
    return Normalizer(
        np.mean([n.mean for n in norms], 0).astype(np.float32),
        np.mean([n.std for n in norms], 0).astype(np.float32),
    )


def trained_bin_width(decoder: Decoder) -> float:
    """The count bin (s) the model's masked readout was trained on (its training config's
    ``mtm.bin_width``, which ``mtm-head`` records too): a fit on other bins would score log-rates
    the head never learned to give."""
    mtm = decoder.info.get("train_config", {}).get("mtm") or {}
    if "bin_width" not in mtm:
        raise ValueError("the model does not say which bins its MtM head was trained on")
    return float(mtm["bin_width"])


def pick_output(decoder: Decoder, session: Session, output: str | None) -> str:
    if output is not None:
        decoder.output_index(output)  # raises with the list of outputs
        return output
    if session.behavior:
        own = session.default_output()
        if own in decoder.model.output_names:
            return own
    return decoder.model.output_names[0]


def fit_units_unsupervised(
    decoder: Decoder,
    session: Session,
    span: tuple[float, float],
    settings: UnsupervisedSettings | None = None,
    progress: Callable[[int, float], None] | None = None,
    show_bar: bool = False,
) -> Decoder:
    """Calibrate ``session`` from its spikes in ``span`` alone; returns a new Decoder.

    Only the new units' embeddings and the new session's embedding change; every other row
    and weight of the returned model is bit-identical to ``decoder``'s. The behaviour in
    ``session`` (if any) is never read.
    """
    st = settings or UnsupervisedSettings()
    if decoder.model.mtm is None:
        raise ValueError(
            "label-free calibration needs a model trained with the masked objective "
            "(mtm.enabled: true in its training config); this one has no MtM head"
        )
    if st.threads:
        torch.set_num_threads(st.threads)
    window = st.window or decoder.config.context
    lo, hi = np.searchsorted(session.spike_times, span)
    if hi - lo == 0:
        raise ValueError("no spikes in the calibration span: label-free calibration needs spiking")
    if span[1] - span[0] <= window + 0.5:
        raise ValueError(
            f"calibration span {span[1] - span[0]:.1f} s is too short (need > {window + 0.5} s)"
        )
    bin_width = st.bin_width or trained_bin_width(decoder)
    output = pick_output(decoder, session, st.output)
    warm = plan_for(decoder, session, st.warm_start, span)
    near = nearest_day_norm(decoder, session, warm, output) if warm is not None else None
    norm = near or unlabelled_norm(decoder, output)
    with _SEED_LOCK:  # the new rows' random start: the same whichever thread fits
        torch.manual_seed(st.seed)
        dec = add_session(decoder, session, output, norm, warm)
    model = dec.model
    sid = session.session_id
    first_unit, first_session = len(decoder.units), len(decoder.sessions)
    rows = NewRows(model, first_unit, first_session, fit_session=st.fit_session)
    lr = st.warm_lr if warm is not None and st.warm_lr is not None else st.lr
    groups = [{"params": [rows.offsets], "lr": lr}]
    if st.fit_session:
        groups.append({"params": [rows.session], "lr": st.session_lr or lr})
    opt = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in opt.param_groups]

    mtm = MtMSettings(
        enabled=True,
        bin_width=bin_width,
        window=window,
        schemes=st.schemes,
        mask_ratio=st.mask_ratio,
        forward_s=st.forward_s,
        batch_size=st.batch_size,
    )
    src = MtMSource(
        session=session,
        session_index=dec.sessions[sid],
        unit_index=dec.units.session_units(sid, session.unit_ids),
        span=span,
    )
    sampler = MtMSampler([src], dec.config.latent_step, window, mtm, seed=st.seed)
    model.train()
    for step in tqdm(range(st.steps), desc="calibrate", disable=not show_bar, dynamic_ncols=True):
        _, batch = sampler.batch(step)
        log_rate = functional_call(
            model, rows.tables(), args=(), kwargs={"mode": "mtm", **to_torch(batch, MTM_KEYS)}
        )
        loss = masked_poisson_nll(
            log_rate,
            torch.from_numpy(batch["mtm_counts"]),
            torch.from_numpy(batch["mtm_scored"]),
            bin_width,
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
        "calibrated": {
            "session": sid,
            "span": list(span),
            "steps": st.steps,
            "labels": "none",
            "output": output,
            "lr": lr,
            "bin_width": bin_width,
        }
    }
    return dec


def calibrate_report_unsupervised(
    decoder: Decoder,
    session: Session,
    seconds: float = 60.0,
    output: str | None = None,
    steps: int = 150,
    settings: UnsupervisedSettings | None = None,
) -> tuple[dict[str, Any], Decoder]:
    """``calibrate --labels none``: fit on the spikes of the first ``seconds`` of the
    training part; if the file has the behaviour, score the last 30% (R², causal mode)."""
    split = time_split(session)
    start = split.fit[0]
    stop = min(start + seconds, split.fit[1])
    st = settings or UnsupervisedSettings(steps=steps, output=output)
    t0 = time.perf_counter()
    dec = fit_units_unsupervised(decoder, session, (start, stop), st, show_bar=True)
    out = dec.info["calibrated"]["output"]
    report: dict[str, Any] = {
        "session": session.session_id,
        "labels": "none",
        "seconds": stop - start,
        "output": out,
        "wall_s": time.perf_counter() - t0,
    }
    if out in session.behavior:
        report["r2"] = score_span(dec, session, out, split.test)
    return report, dec
