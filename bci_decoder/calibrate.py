"""Unit identification: adapt a pretrained model to a new session in seconds.

Only the new session's unit embeddings (and its session embedding) are fitted; every
other weight is frozen, so what the model learned across sessions carries over and a
short labelled block suffices.

The mean of the new unit embeddings is held at its initial value (the mean of the
pretrained units). The encoder sums the embeddings of a group's spikes (the count path),
so a shift shared by all units moves that sum by (spikes per group) x (shift): ~200x on a
dense Utah-array session such as jango_20160711 (3,700 spikes/s), where Adam's common-mode
steps threw the latents off their trained range and the fit sat at R² ~0.05. Only the
differences between units carry identity; fixing their mean took that session from R² 0.06
to 0.82 (60 s) and leaves sparse sessions unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bci_decoder.config import SamplerSettings
from bci_decoder.data.session import Session, time_split
from bci_decoder.decode import CAUSAL_KEYS, decode_causal, session_tokens, to_torch
from bci_decoder.metrics import r2_score
from bci_decoder.model.vocab import unit_key
from bci_decoder.train.checkpoint import Decoder, Normalizer
from bci_decoder.train.data import BatchSampler, SessionSource
from bci_decoder.train.loop import masked_mse


@dataclass
class CalibrationSettings:
    steps: int = 150
    lr: float = 3e-2
    batch_size: int = 8
    sequence: float = 1.5
    burn_in: float = 0.5
    max_queries: int = 16
    threads: int = 0  # 0: torch's default
    seed: int = 0


def add_session(decoder: Decoder, session: Session, output: str, norm: Normalizer) -> Decoder:
    """A copy of ``decoder`` that knows ``session``'s units (new embeddings, initialised at
    the mean of the known ones) and the session itself."""
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
) -> Decoder:
    """Calibrate ``session`` on the behaviour in ``span``; returns a new Decoder."""
    st = settings or CalibrationSettings()
    if st.threads:
        torch.set_num_threads(st.threads)
    torch.manual_seed(st.seed)
    beh = session.behavior[output].between(*span)
    if len(beh.timestamps) < 10:
        raise ValueError(f"only {len(beh.timestamps)} behaviour samples in the calibration span")
    if span[1] - span[0] <= st.sequence + 0.5:
        raise ValueError(
            f"calibration span {span[1] - span[0]:.1f} s is too short (need > {st.sequence + 0.5} s)"
        )
    norm = Normalizer.fit(beh.data)
    dec = add_session(decoder, session, output, norm)
    model = dec.model
    sid = session.session_id
    unit_index = dec.units.session_units(sid, session.unit_ids)
    first_new_unit = len(decoder.units)
    first_new_session = len(decoder.sessions)
    for p in model.parameters():
        p.requires_grad_(False)
    model.unit_emb.weight.requires_grad_(True)
    model.session_emb.weight.requires_grad_(True)
    # only the rows of the new units/session move; the others stay bit-identical
    model.unit_emb.weight.register_hook(_rows_from(first_new_unit))
    with torch.no_grad():
        new_mean = model.unit_emb.weight[first_new_unit:].mean(0).clone()
    model.session_emb.weight.register_hook(_rows_from(first_new_session))
    opt = torch.optim.Adam([model.unit_emb.weight, model.session_emb.weight], lr=st.lr)
    src = SessionSource(
        session=session,
        session_index=dec.sessions[sid],
        unit_index=unit_index,
        output=output,
        output_index=dec.output_index(output),
        norm=norm,
        span=span,
    )
    sampler = BatchSampler(
        [src],
        dec.config.latent_step,
        dec.config.context,
        SamplerSettings(
            batch_size=st.batch_size,
            sequence=st.sequence,
            burn_in=st.burn_in,
            max_queries=st.max_queries,
            window_fraction=0.0,
            unit_dropout=0.0,
        ),
        seed=st.seed,
        modes=("causal",),
    )
    model.train()
    for step in tqdm(range(st.steps), desc="calibrate", disable=not show_bar, dynamic_ncols=True):
        _, batch = sampler.batch(step)
        pred = model(mode="causal", **to_torch(batch, CAUSAL_KEYS))
        loss = masked_mse(
            pred, torch.from_numpy(batch["target"]), torch.from_numpy(batch["target_mask"])
        )
        for g in opt.param_groups:  # cosine decay: large steps first, then settle
            g["lr"] = st.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / st.steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # hold the new units' mean (see the module docstring)
            rows = model.unit_emb.weight[first_new_unit:]
            rows -= rows.mean(0) - new_mean
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    dec.info = dict(dec.info) | {
        "calibrated": {"session": sid, "span": list(span), "steps": st.steps}
    }
    return dec


def _rows_from(first: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:first] = 0
        return grad

    return hook


def score_span(decoder: Decoder, session: Session, output: str, span: tuple[float, float]) -> float:
    """Causal-mode R² of the behaviour samples in ``span``."""
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
) -> tuple[dict[str, Any], Decoder]:
    """The ``calibrate`` command: fit on the first ``seconds`` of the training part, score
    the last 30%, next to Wiener and GRU fitted on the same seconds and on the full 70%."""
    output = output or session.default_output()
    if output not in session.behavior:
        raise ValueError(f"the session has no behaviour {output!r}: {list(session.behavior)}")
    split = time_split(session)
    start = split.fit[0]
    stop = min(start + seconds, split.fit[1])
    st = settings or CalibrationSettings(steps=steps)
    t0 = time.perf_counter()
    dec = fit_units(decoder, session, output, (start, stop), st, show_bar=True)
    wall = time.perf_counter() - t0
    report: dict[str, Any] = {
        "session": session.session_id,
        "seconds": stop - start,
        "output": output,
        "r2": score_span(dec, session, output, split.test),
        "wall_s": wall,
    }
    if baselines:
        from bci_decoder.baselines import evaluate_baselines

        same = evaluate_baselines(session, output, (start, stop), split.test, ("wiener", "gru"))
        full = evaluate_baselines(session, output, split.fit, split.test, ("wiener", "gru"))
        report |= {
            "wiener_same_seconds": same["wiener"]["r2"],
            "wiener_full": full["wiener"]["r2"],
            "gru_same_seconds": same["gru"]["r2"],
            "gru_full": full["gru"]["r2"],
        }
    return report, dec
