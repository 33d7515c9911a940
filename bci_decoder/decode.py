"""Offline decoding of a whole session, in both modes.

``decode_stream`` runs the session through the streaming engine (``StreamingEngine.decode``,
the ONNX graphs the daemon runs), so offline scores measure what runs live; it is what
``decode_session`` uses in both modes. ``decode_causal`` and ``decode_window`` are the
torch reference the engine is tested against: causal mode streams the session in chunks
of groups with the cache of finished groups carried over, so each prediction at t uses
only spikes up to t, exactly as live; window mode decodes each query from the window that
ends at it.
"""

from __future__ import annotations

import numpy as np
import torch

from bci_decoder.data.session import Session
from bci_decoder.model import layout
from bci_decoder.tokenizer import (
    collate_causal,
    collate_window,
    grid_index,
    tokenize_causal,
    tokenize_window,
)
from bci_decoder.train.checkpoint import Decoder

CAUSAL_KEYS = (
    "spike_unit spike_time spike_mask group_index query_time query_group query_mask session output"
).split()
WINDOW_KEYS = "spike_unit spike_time spike_mask latent_time query_time session output".split()


def to_torch(batch: dict[str, np.ndarray], keys: list[str]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(batch[k])) for k in keys}


def session_tokens(decoder: Decoder, session: Session) -> tuple[np.ndarray, np.ndarray, int]:
    """Spike times, vocabulary unit index per spike, and the session's vocabulary index."""
    if session.session_id not in decoder.sessions:
        raise KeyError(
            f"session {session.session_id!r} is unknown to this model; calibrate it first "
            f"(bci-decoder calibrate)"
        )
    units = decoder.units.session_units(session.session_id, session.unit_ids)
    return session.spike_times, units[session.spike_units], decoder.sessions[session.session_id]


@torch.no_grad()
def decode_causal(
    decoder: Decoder,
    spike_times: np.ndarray,
    spike_units: np.ndarray,
    session_index: int,
    output: str,
    query_times: np.ndarray,
    *,
    burn_in: float = 3.0,
    chunk_groups: int = 40,
) -> np.ndarray:
    """Normalised predictions (Q, D) at sorted ``query_times`` in causal mode.

    The stream starts ``burn_in`` seconds before the first query so the cache of finished
    groups is warm, as it is on a rig that has been running.
    """
    model = decoder.model.eval()
    step = decoder.config.latent_step
    out_idx = decoder.output_index(output)
    dim = model.output_dims[output]
    query_times = np.asarray(query_times, dtype=np.float64)
    if query_times.size == 0:
        return np.zeros((0, dim), np.float32)
    if np.any(np.diff(query_times) < 0):
        raise ValueError("query times must be sorted")
    k = int(grid_index(query_times[0] - burn_in, step))
    k_end = int(grid_index(query_times[-1], step))
    preds = []
    cache = None
    a = np.searchsorted(spike_times, k * step, side="right")
    while k < k_end:
        G = min(chunk_groups, k_end - k)
        t1 = (k + G) * step
        b = np.searchsorted(spike_times, t1, side="right")
        qa = np.searchsorted(query_times, k * step, side="right")
        qb = np.searchsorted(query_times, t1, side="right")
        sample = tokenize_causal(
            spike_times[a:b], spike_units[a:b], k + 1, G, step, query_times[qa:qb]
        )
        sample.session, sample.output = session_index, out_idx
        batch = to_torch(collate_causal([sample]), CAUSAL_KEYS)
        pred, cache = model.forward_causal(**batch, cache=cache, return_cache=True)
        preds.append(pred[0, : qb - qa, :dim].numpy())
        k, a = k + G, b
    return np.concatenate(preds)


@torch.no_grad()
def decode_window(
    decoder: Decoder,
    spike_times: np.ndarray,
    spike_units: np.ndarray,
    session_index: int,
    output: str,
    query_times: np.ndarray,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Normalised predictions (Q, D), each from the window that ends at its query."""
    model = decoder.model.eval()
    c = decoder.config
    out_idx = decoder.output_index(output)
    dim = model.output_dims[output]
    preds = []
    for i in range(0, len(query_times), batch_size):
        samples = []
        for t in query_times[i : i + batch_size]:
            s = tokenize_window(spike_times, spike_units, float(t), c.context, c.latent_step)
            s.session, s.output = session_index, out_idx
            samples.append(s)
        batch = to_torch(collate_window(samples), WINDOW_KEYS)
        preds.append(model.forward_window(**batch)[:, 0, :dim].numpy())
    if not preds:
        return np.zeros((0, dim), np.float32)
    return np.concatenate(preds)


def stream_start(query_time: float, burn_in: float, step: float) -> float:
    """Where ``decode_causal`` starts its stream for a first query: the end of the group
    after the one owning ``query_time - burn_in`` (a time its first group owns)."""
    return float((grid_index(query_time - burn_in, step) + 1) * step)


def decode_stream(
    decoder: Decoder,
    session: Session,
    output: str,
    query_times: np.ndarray,
    *,
    mode: str = "causal",
    burn_in: float = 3.0,
    backend: str = "onnx",
    threads: int = 1,
    workers: int = 1,
) -> np.ndarray:
    """Normalised predictions (Q, D) at sorted ``query_times`` through the streaming
    engine: the same graphs, unit tables and state as live decoding. Causal mode starts
    the stream ``burn_in`` seconds before the first query, as ``decode_causal`` does.
    ``threads``: ONNX Runtime intra-op threads; ``workers``: 2 decodes on two threads
    (``StreamingEngine.decode``)."""
    from bci_decoder.runtime.engine import StreamingEngine, UnitTables

    q = np.asarray(query_times, dtype=np.float64)
    session_tokens(decoder, session)  # the clear error for an unknown session
    sizes = {}
    if mode == "window" and q.size:  # room for the fullest window: none is cut short
        t = session.spike_times
        most = int(
            (
                np.searchsorted(t, q, "right")
                - np.searchsorted(t, q - decoder.config.context, "right")
            ).max()
        )
        sizes["max_spikes_per_window"] = max(layout.WINDOW_SPIKES, most)
    engine = StreamingEngine(
        decoder,
        session.session_id,
        output,
        mode=mode,
        backend=backend,
        intra_op_threads=threads,
        **sizes,
    )
    # the engine's local unit index is the session's own unit index
    engine.set_units(
        UnitTables.from_decoder(decoder, session.session_id, output, list(session.unit_ids))
    )
    start = stream_start(q[0], burn_in, decoder.config.latent_step) if q.size else None
    return engine.decode(
        session.spike_times,
        session.spike_units,
        q,
        start=start if mode == "causal" else None,
        normalised=True,
        workers=workers,
    )


def decode_session(
    decoder: Decoder,
    session: Session,
    output: str,
    span: tuple[float, float],
    mode: str = "causal",
    backend: str = "engine",
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode the behaviour samples of ``span``: (timestamps, target, prediction), the
    prediction in the behaviour's own units. ``backend="engine"``: through the streaming
    engine (what runs live; window mode's ONNX step is ~18x faster than the batched torch
    forward, whose tokenizing and padding dominate); ``"torch"``: the torch reference."""
    if backend not in ("engine", "torch"):
        raise ValueError(f"backend must be 'engine' or 'torch', not {backend!r}")
    times, units, sidx = session_tokens(decoder, session)
    beh = session.behavior[output].between(*span)
    if backend == "engine" and mode in ("causal", "window"):
        z = decode_stream(decoder, session, output, beh.timestamps, mode=mode, workers=workers)
    elif mode == "causal":
        z = decode_causal(decoder, times, units, sidx, output, beh.timestamps)
    elif mode == "window":
        z = decode_window(decoder, times, units, sidx, output, beh.timestamps)
    else:
        raise ValueError(f"mode must be 'causal' or 'window', not {mode!r}")
    norm = decoder.norms[session.session_id][output]
    return beh.timestamps, beh.data, norm.inverse(z)
