"""Fit a session's recurrent readout (``model.session_readout``) on frozen features.

The decoder's features come from the streaming engine (``decode_features``: the ONNX
graphs the daemon runs), at the session's behaviour samples and at every group's end,
from the start of the session to the end of its validation tail; the test part (last
30%) is never decoded. The GRU is trained with truncated back-propagation: windows of
``window`` groups of the training part, each from a zero state, the queries of its
first ``burn_in`` groups left out of the loss (their state has seen too little). The
epoch whose validation-tail R² is best is kept; the readout is kept only when that R²
beats the model's own linear head on the same tail (``kept``). With ``counts`` the GRU
also reads each unit's spike count in the group so far (the engine's count of the
spikes it was given, ``decode_features(counts=...)``); by default a readout with and one
without are fitted and the tail chooses. A readout of counts is stored in the package's
unit order of the session (``for_units``). Torch, one thread by default; a session of
45 min fits in about three minutes (both readouts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from bci_decoder.data.session import Session, time_split
from bci_decoder.decode import stream_start
from bci_decoder.metrics import r2_score
from bci_decoder.model.decoder import Decoder
from bci_decoder.model.session_readout import SessionReadout
from bci_decoder.tokenizer import grid_index


class ReadoutSettings(BaseModel):
    """How a session readout is fitted (``bci-decoder readout`` options)."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = 128  # GRU units
    # each unit's sqrt spike count in the group besides the features: "yes", "no", or
    # "choose" (fit both, keep the better on the validation tail: counts helped the
    # sessions of much training data, Jango's 45 min, and overfit chewie's few minutes)
    counts: Literal["yes", "no", "choose"] = "choose"
    lr: float = 2e-3  # Adam
    dropout: float = 0.2  # on the features, in training
    window: int = 60  # groups per training window (3 s at 50 ms)
    burn_in: int = 20  # groups of a window whose queries are left out of the loss
    batch: int = 64  # windows per step
    max_epochs: int = 40
    patience: int = 6  # epochs without a better validation R² before stopping
    epoch_fraction: float = 0.1  # an epoch: this share of the window starts,
    min_windows: int = 512  # and at least this many
    seed: int = 0
    threads: int = 1  # torch threads of the fit; 0: as they are
    workers: int = 2  # offline decoding of the features (two cores)


def session_features(
    decoder: Decoder,
    session: Session,
    output: str,
    stop: float,
    workers: int = 2,
    start: float | None = None,
    counts: bool = False,
) -> dict[str, Any]:
    """The features of ``session`` from ``start`` (its beginning) to ``stop`` (s), through
    the streaming engine: behaviour times, targets, each sample's features (Q, D), the
    first group decoded and every group's end-time features (G, D); with ``counts``, C
    more columns each, the spike counts of the session's units (``unit_ids`` order) in
    the group up to that time, and ``units`` = C."""
    from bci_decoder.runtime.engine import StreamingEngine, UnitTables

    lo = session.domain[0] if start is None else start
    beh = session.behavior[output].between(lo, stop)
    if len(beh.timestamps) < 10:
        raise ValueError(f"{session.session_id}: too few behaviour samples before {stop} s")
    engine = StreamingEngine(decoder, session.session_id, output)
    engine.set_units(
        UnitTables.from_decoder(decoder, session.session_id, output, list(session.unit_ids))
    )
    q = beh.timestamps
    start = stream_start(q[0], 3.0, decoder.config.latent_step)
    C = len(session.unit_ids) if counts else 0
    qf, first, gf = engine.decode_features(
        session.spike_times, session.spike_units, q, start=start, workers=workers, counts=C
    )
    return {"times": q, "target": beh.data, "qfeat": qf, "first": first, "gfeat": gf, "units": C}


def in_package_order(readout: SessionReadout, decoder: Decoder, session: Session) -> SessionReadout:
    """A readout fitted on ``session.unit_ids``' order, in the order the model package
    lists the session's units (``ModelPackage.session_unit_names``; ``UnitTables`` reorders
    from there to a stream's units)."""
    names = decoder.units.unit_names(session.session_id)
    pos = {u: i for i, u in enumerate(session.unit_ids)}
    return readout.for_units(np.array([pos[u] for u in names], np.int64))


def linear_head(decoder: Decoder, output: str) -> Callable[[np.ndarray], np.ndarray]:
    """The model's own readout of ``output``: features (Q, D) -> normalised (Q, O), the bar
    a session readout must beat."""
    lin = decoder.model.heads[output]

    def head(f: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return lin(torch.from_numpy(np.asarray(f, np.float32))).numpy()

    return head


class _Readout(torch.nn.Module):
    """The GRU and head in torch, the cell written out as ``SessionReadout.cell``."""

    def __init__(self, features: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(features, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, outputs)

    def cell(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = self.gru
        gi = x @ g.weight_ih_l0.T + g.bias_ih_l0
        gh = h @ g.weight_hh_l0.T + g.bias_hh_l0
        H = h.shape[-1]
        r = torch.sigmoid(gi[..., :H] + gh[..., :H])
        z = torch.sigmoid(gi[..., H : 2 * H] + gh[..., H : 2 * H])
        n = torch.tanh(gi[..., 2 * H :] + r * gh[..., 2 * H :])
        return (1 - z) * n + z * h

    def states(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) from zero states -> (B, T+1, H), row 0 the zero state."""
        out, _ = self.gru(x)
        return torch.cat([out.new_zeros(out.shape[0], 1, out.shape[2]), out], 1)

    def load(self, r: SessionReadout) -> None:
        """Start from ``r``'s GRU (and head, where the output dims match)."""
        g = self.gru
        if r.w_ih.shape != tuple(g.weight_ih_l0.shape) or r.hidden != g.hidden_size:
            raise ValueError(
                f"a readout of {r.w_ih.shape[1]} inputs and {r.hidden} units cannot start "
                f"a fit of {g.input_size} and {g.hidden_size}"
            )
        pairs = [(g.weight_ih_l0, r.w_ih), (g.weight_hh_l0, r.w_hh), (g.bias_ih_l0, r.b_ih),
                 (g.bias_hh_l0, r.b_hh)]  # fmt: skip
        if r.head_w.shape == tuple(self.head.weight.shape):
            pairs += [(self.head.weight, r.head_w), (self.head.bias, r.head_b)]
        with torch.no_grad():
            for p, a in pairs:
                p.copy_(torch.tensor(np.asarray(a)))

    def export(self, in_mean: np.ndarray, in_std: np.ndarray, counts: int = 0) -> SessionReadout:
        g = self.gru

        def a(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy()

        return SessionReadout(
            a(g.weight_ih_l0), a(g.weight_hh_l0), a(g.bias_ih_l0), a(g.bias_hh_l0),
            a(self.head.weight), a(self.head.bias), in_mean, in_std, np.array([counts]),
        )  # fmt: skip


def fit_readout(
    feats: dict[str, Any],
    norm,
    head: Callable[[np.ndarray], np.ndarray],
    step: float,
    train_end: float,
    valid: tuple[float, float],
    settings: ReadoutSettings | None = None,
    progress: bool = True,
    init: SessionReadout | None = None,
) -> tuple[SessionReadout, dict[str, Any]]:
    """Fit on the samples before ``train_end``, choose the epoch on ``valid``.

    ``norm``: the output's normaliser (targets as z-scores); ``head``: the model's own
    linear readout of features (Q, D) -> normalised outputs, the bar on ``valid``. Where
    ``feats`` carry spike counts (``units`` C > 0, the last C columns), the GRU reads
    their square roots too. ``init``: a readout of the same inputs and hidden size to
    start from (its head too where the output dims match), instead of random weights."""
    st = settings or ReadoutSettings()
    t0 = time.perf_counter()
    torch.manual_seed(st.seed)
    rng = np.random.default_rng(st.seed)
    threads = torch.get_num_threads()
    if st.threads > 0:
        torch.set_num_threads(st.threads)
    try:
        qt, y = feats["times"], feats["target"]
        C = int(feats.get("units", 0))
        qf, gf, first = feats["qfeat"], feats["gfeat"], feats["first"]
        D = qf.shape[1] - C
        if C:  # the counts' square roots, as SessionReadout.inputs reads them
            qf = np.concatenate([qf[:, :D], np.sqrt(qf[:, D:])], 1)
            gf = np.concatenate([gf[:, :D], np.sqrt(gf[:, D:])], 1)
        prev = grid_index(qt, step) - first  # each query's state: after the groups before it
        train = qt < train_end
        vmask = (qt > valid[0]) & (qt <= valid[1])
        if train.sum() < 2 * st.window or vmask.sum() < 10:
            raise ValueError("too little data for a session readout (train or validation)")
        n_train_groups = int(prev[train].max())  # groups that end before the last train query
        in_mean = gf[:n_train_groups].mean(0)
        in_std = gf[:n_train_groups].std(0) + 1e-6
        gz = torch.from_numpy(((gf - in_mean) / in_std).astype(np.float32))
        qz = torch.from_numpy(((qf - in_mean) / in_std).astype(np.float32))
        yz = torch.from_numpy(np.asarray(norm.forward(y), np.float32))
        model = _Readout(gf.shape[1], st.hidden, y.shape[1])
        if init is not None:
            model.load(init)
        opt = torch.optim.Adam(model.parameters(), st.lr)
        drop = torch.nn.Dropout(st.dropout)
        T, burn = st.window, st.burn_in
        starts = np.arange(0, max(1, n_train_groups - T))
        train_idx = np.flatnonzero(train)
        tprev = prev[train_idx]

        def score(m: torch.nn.Module) -> float:
            with torch.no_grad():
                states = m.states(gz[None])[0]
                z = m.head(m.cell(states[prev[vmask]], qz[vmask])).numpy()
            return r2_score(y[vmask], norm.inverse(z))

        base = r2_score(y[vmask], norm.inverse(head(qf[vmask, :D])))
        best = (-np.inf, None, -1)
        per_epoch = min(len(starts), max(st.min_windows, int(len(starts) * st.epoch_fraction)))
        bar = tqdm(range(st.max_epochs), desc="readout", disable=not progress, leave=False)
        epochs = 0
        for epoch in bar:
            model.train()
            order = rng.permutation(starts)[:per_epoch]
            for i in range(0, len(order), st.batch):
                s0 = order[i : i + st.batch]  # (B,) window starts (group offsets)
                idx = s0[:, None] + np.arange(T)[None]  # (B, T)
                states = model.states(drop(gz[idx]))  # (B, T+1, H)
                lo = np.searchsorted(tprev, s0 + burn, "left")
                hi = np.searchsorted(tprev, s0 + T, "right")
                M = int((hi - lo).max())
                if M == 0:
                    continue
                slot = lo[:, None] + np.arange(M)[None]  # (B, M) into train_idx
                valid_slot = slot < hi[:, None]
                slot = np.minimum(slot, len(train_idx) - 1)
                qi = train_idx[slot]  # (B, M) query indices
                rows = np.clip(prev[qi] - s0[:, None], 0, T)
                h = states[np.arange(len(s0))[:, None], rows]  # (B, M, H)
                pred = model.head(model.cell(h, drop(qz[qi])))
                err = ((pred - yz[qi]) ** 2).mean(-1)
                mask = torch.from_numpy(valid_slot)
                loss = (err * mask).sum() / mask.sum().clamp(min=1)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            r2 = score(model)
            epochs = epoch + 1
            if r2 > best[0]:
                best = (r2, {k: v.clone() for k, v in model.state_dict().items()}, epoch)
            elif epoch - best[2] >= st.patience:
                break
            bar.set_postfix(valid=f"{r2:.3f}", best=f"{best[0]:.3f}", base=f"{base:.3f}")
        model.load_state_dict(best[1])
        readout = model.export(in_mean.astype(np.float32), in_std.astype(np.float32), C)
    finally:
        torch.set_num_threads(threads)
    report = {
        "valid_r2_head": float(base),
        "valid_r2_readout": float(best[0]),
        "kept": bool(best[0] > base),
        "best_epoch": int(best[2]),
        "epochs": epochs,
        "seconds": time.perf_counter() - t0,
        "hidden": st.hidden,
        "counts": C,
    }
    return readout, report


def fit_session_readout(
    decoder: Decoder,
    session: Session,
    output: str | None = None,
    settings: ReadoutSettings | None = None,
    progress: bool = True,
) -> tuple[SessionReadout, dict[str, Any]]:
    """The readout of a session the model knows, fitted on its training part (first 63%),
    chosen on its validation tail (63-70%); the test part is never read."""
    st = settings or ReadoutSettings()
    output = output or session.default_output()
    split = time_split(session)
    feats = session_features(
        decoder, session, output, split.valid[1], st.workers, counts=st.counts != "no"
    )
    norm = decoder.norms[session.session_id][output]
    variants = {"yes": [feats], "no": [without_counts(feats)]}
    variants["choose"] = variants["no"] + variants["yes"]
    head, step = linear_head(decoder, output), decoder.config.latent_step
    fits = [
        fit_readout(f, norm, head, step, split.train[1], split.valid, st, progress)
        for f in variants[st.counts]
    ]
    readout, report = max(fits, key=lambda fit: fit[1]["valid_r2_readout"])
    tried = {f"counts={rep['counts']}": rep["valid_r2_readout"] for _, rep in fits}
    report = report | {"valid_r2_tried": tried, "seconds": sum(rep["seconds"] for _, rep in fits)}
    readout = in_package_order(readout, decoder, session)
    return readout, {"session": session.session_id, "output": output, **report}


def without_counts(feats: dict[str, Any]) -> dict[str, Any]:
    """``session_features`` without their spike-count columns."""
    C = int(feats.get("units", 0))
    if not C:
        return feats
    return feats | {"qfeat": feats["qfeat"][:, :-C], "gfeat": feats["gfeat"][:, :-C], "units": 0}


def fit_block_readout(
    decoder: Decoder,
    session: Session,
    output: str,
    cuts: tuple[float, float, float],
    hidden: tuple[int, ...] = (128,),
    min_gain: float = 0.005,
    threads: int = 1,
    max_epochs: int = 25,
    min_windows: int = 256,
    counts: bool = False,
) -> tuple[SessionReadout | None, dict[str, Any]]:
    """A calibration block's readout (``calibrate.adapt``'s last stage): features of
    [lo, hi) from the calibrated model, a GRU of each size in ``hidden`` fitted on
    [lo, cut) and scored on [cut, hi); the best is returned where it beats the linear head
    on that slice by ``min_gain``, else None. One core (features decoded on one worker).
    ``counts``: the GRU reads the units' spike counts too (``ReadoutSettings.counts``)."""
    lo, cut, hi = cuts
    feats = session_features(decoder, session, output, hi, workers=1, start=lo, counts=counts)
    norm = decoder.norms[session.session_id][output]
    head = linear_head(decoder, output)
    best: tuple[SessionReadout | None, dict[str, Any]] = (None, {})
    for h in hidden:
        st = ReadoutSettings(hidden=h, threads=threads, workers=1, max_epochs=max_epochs,
                             patience=min(6, max_epochs), min_windows=min_windows)  # fmt: skip
        r, rep = fit_readout(
            feats, norm, head, decoder.config.latent_step, cut, (cut, hi), st, progress=False
        )
        if best[0] is None or rep["valid_r2_readout"] > best[1]["valid_r2_readout"]:
            best = (in_package_order(r, decoder, session), rep)
    r, rep = best
    kept = rep["valid_r2_readout"] > rep["valid_r2_head"] + min_gain
    return (r if kept else None), rep | {"kept": kept, "min_gain": min_gain}
