"""Spikes -> token arrays. One implementation, numpy only, for training, evaluation and
streaming ("this code runs on CPU": the model's forward is pure tensor math).

Time is absolute float64 seconds. Latents live on an absolute grid of step ``s``: grid
index ``k`` stands for time ``k * s`` and its *group* owns the spikes in ((k-1)·s, k·s].

Causal sample (one training sequence or one evaluation chunk)
    groups  k0+1 .. k0+G, each with up to ``S`` spikes (padded)
    queries at arbitrary times t_q in (k0·s, (k0+G)·s]; query q belongs to the group
    g_q = grid_index(t_q) and sees that group's spikes up to t_q (the *partial* group).

Window sample (POYO as published)
    the spikes in (t - W, t], latents at t - W + k·s for k = 1..W/s, one query at t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SPIKE_TOKEN = 0  # token type; room for unit start/end tokens later


def grid_index(t: np.ndarray | float, step: float) -> np.ndarray:
    """Smallest integer k with k·step >= t, exact in float64 (the group that owns t).

    ``ceil(t / step)`` alone can be off by one when t/step rounds across an integer;
    the fix-up compares against the products the rest of the code uses for grid times.
    """
    t = np.asarray(t, dtype=np.float64)
    k = np.ceil(t / step).astype(np.int64)
    k = np.where((k - 1) * step >= t, k - 1, k)
    k = np.where(k * step < t, k + 1, k)
    return k


def grid_time(k: np.ndarray | int, step: float) -> np.ndarray:
    """Time of grid index k (float64)."""
    return np.asarray(k, dtype=np.int64) * np.float64(step)


@dataclass
class CausalSample:
    """Tokens of one causal sequence. Shapes: G groups, S spikes per group, Q queries."""

    spike_unit: np.ndarray  # (G, S) int64, vocabulary index, 0 where padded
    spike_time: np.ndarray  # (G, S) float64 absolute seconds
    spike_mask: np.ndarray  # (G, S) bool
    group_index: np.ndarray  # (G,) int64 absolute grid index k
    query_time: np.ndarray  # (Q,) float64
    query_group: np.ndarray  # (Q,) int64 absolute grid index of the owning group
    query_mask: np.ndarray  # (Q,) bool
    session: int = 0
    output: int = 0
    target: np.ndarray | None = None  # (Q, D) float32, z-scored
    target_mask: np.ndarray | None = None  # (Q, D) bool
    meta: dict = field(default_factory=dict)


def tokenize_causal(
    spike_times: np.ndarray,
    spike_units: np.ndarray,
    first_group: int,
    num_groups: int,
    step: float,
    query_times: np.ndarray,
    max_spikes: int | None = None,
) -> CausalSample:
    """Tokens for groups first_group .. first_group+num_groups-1 (absolute grid indices).

    ``spike_units`` are already vocabulary indices. Spikes outside the groups' span and
    queries outside it are dropped; ``max_spikes`` pads groups to a fixed width.
    """
    spike_times = np.asarray(spike_times, dtype=np.float64)
    spike_units = np.asarray(spike_units, dtype=np.int64)
    g = grid_index(spike_times, step) - first_group  # (N,) group slot
    keep = (g >= 0) & (g < num_groups)
    g, times, units = g[keep], spike_times[keep], spike_units[keep]
    order = np.lexsort((times, g))
    g, times, units = g[order], times[order], units[order]
    counts = np.bincount(g, minlength=num_groups)
    width = int(counts.max()) if counts.size and counts.max() > 0 else 1
    if max_spikes is not None:
        if width > max_spikes:
            raise ValueError(f"a group holds {width} spikes, more than max_spikes={max_spikes}")
        width = max_spikes
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(g)) - starts[g]
    spike_unit = np.zeros((num_groups, width), dtype=np.int64)
    spike_time = np.zeros((num_groups, width), dtype=np.float64)
    spike_mask = np.zeros((num_groups, width), dtype=bool)
    spike_unit[g, slot] = units
    spike_time[g, slot] = times
    spike_mask[g, slot] = True
    # padded slots carry the group's own time so rotations stay finite and harmless
    group_index = np.arange(first_group, first_group + num_groups, dtype=np.int64)
    pad_time = grid_time(group_index, step)[:, None]
    spike_time = np.where(spike_mask, spike_time, pad_time)

    query_times = np.asarray(query_times, dtype=np.float64)
    qg = grid_index(query_times, step)
    qkeep = (qg >= first_group) & (qg < first_group + num_groups)
    return CausalSample(
        spike_unit=spike_unit,
        spike_time=spike_time,
        spike_mask=spike_mask,
        group_index=group_index,
        query_time=query_times[qkeep],
        query_group=qg[qkeep],
        query_mask=np.ones(int(qkeep.sum()), dtype=bool),
        meta={"query_keep": qkeep},
    )


@dataclass
class WindowSample:
    """Tokens of one window ending at ``query_time``. N spikes, K latent groups."""

    spike_unit: np.ndarray  # (N,) int64
    spike_time: np.ndarray  # (N,) float64
    spike_mask: np.ndarray  # (N,) bool
    latent_time: np.ndarray  # (K,) float64
    query_time: np.ndarray  # (1,) float64
    session: int = 0
    output: int = 0
    target: np.ndarray | None = None  # (1, D)
    target_mask: np.ndarray | None = None


def tokenize_window(
    spike_times: np.ndarray,
    spike_units: np.ndarray,
    t: float,
    context: float,
    step: float,
) -> WindowSample:
    """Tokens of the window (t - context, t]; latents at t - context + k·step, k = 1..K."""
    spike_times = np.asarray(spike_times, dtype=np.float64)
    lo = np.searchsorted(spike_times, t - context, side="right")
    hi = np.searchsorted(spike_times, t, side="right")
    n = hi - lo
    k = int(round(context / step))
    latent_time = t - context + step * np.arange(1, k + 1, dtype=np.float64)
    return WindowSample(
        spike_unit=np.asarray(spike_units[lo:hi], dtype=np.int64),
        spike_time=spike_times[lo:hi].copy(),
        spike_mask=np.ones(n, dtype=bool),
        latent_time=latent_time,
        query_time=np.array([t], dtype=np.float64),
    )


def _pad(arrays: list[np.ndarray], axis: int, fill: float | bool | int) -> np.ndarray:
    width = max(a.shape[axis] for a in arrays)
    width = max(width, 1)
    out = []
    for a in arrays:
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, width - a.shape[axis])
        out.append(np.pad(a, pad, constant_values=fill))
    return np.stack(out)


def collate_causal(samples: list[CausalSample]) -> dict[str, np.ndarray]:
    """Stack causal samples (same number of groups) into a batch of numpy arrays.

    Padded spikes keep their group's time; padded queries repeat the first query's time
    and group and are masked out.
    """
    G = {s.spike_unit.shape[0] for s in samples}
    if len(G) != 1:
        raise ValueError(f"samples in a causal batch need the same number of groups, got {G}")
    batch = {
        "spike_unit": _pad([s.spike_unit for s in samples], 1, 0),
        "spike_time": np.stack(
            [
                np.pad(
                    s.spike_time,
                    [
                        (0, 0),
                        (0, max(x.spike_time.shape[1] for x in samples) - s.spike_time.shape[1]),
                    ],
                    mode="edge",
                )
                for s in samples
            ]
        ),
        "spike_mask": _pad([s.spike_mask for s in samples], 1, False),
        "group_index": np.stack([s.group_index for s in samples]),
        "session": np.array([s.session for s in samples], dtype=np.int64),
        "output": np.array([s.output for s in samples], dtype=np.int64),
    }
    qmax = max(max(len(s.query_time) for s in samples), 1)
    qt = np.zeros((len(samples), qmax))
    qg = np.zeros((len(samples), qmax), dtype=np.int64)
    qm = np.zeros((len(samples), qmax), dtype=bool)
    for i, s in enumerate(samples):
        n = len(s.query_time)
        fill_t = s.query_time[0] if n else s.spike_time[-1, 0]
        fill_g = s.query_group[0] if n else s.group_index[-1]
        qt[i] = fill_t
        qg[i] = fill_g
        qt[i, :n] = s.query_time
        qg[i, :n] = s.query_group
        qm[i, :n] = s.query_mask
    batch.update(query_time=qt, query_group=qg, query_mask=qm)
    if samples[0].target is not None:
        dmax = max(s.target.shape[1] for s in samples)
        tgt = np.zeros((len(samples), qmax, dmax), dtype=np.float32)
        tm = np.zeros((len(samples), qmax, dmax), dtype=bool)
        for i, s in enumerate(samples):
            n, d = s.target.shape
            tgt[i, :n, :d] = s.target
            tm[i, :n, :d] = s.target_mask if s.target_mask is not None else True
        batch.update(target=tgt, target_mask=tm)
    return batch


def collate_window(samples: list[WindowSample]) -> dict[str, np.ndarray]:
    """Stack window samples (same number of latents) into a batch."""
    batch = {
        "spike_unit": _pad([s.spike_unit for s in samples], 0, 0),
        "spike_time": np.stack(
            [
                np.pad(
                    s.spike_time,
                    (0, max(len(x.spike_time) for x in samples) - len(s.spike_time)),
                    constant_values=s.query_time[0],
                )
                for s in samples
            ]
        ),
        "spike_mask": _pad([s.spike_mask for s in samples], 0, False),
        "latent_time": np.stack([s.latent_time for s in samples]),
        "query_time": np.stack([s.query_time for s in samples]),
        "query_mask": np.ones((len(samples), 1), dtype=bool),
        "session": np.array([s.session for s in samples], dtype=np.int64),
        "output": np.array([s.output for s in samples], dtype=np.int64),
    }
    if samples[0].target is not None:
        dmax = max(s.target.shape[1] for s in samples)
        tgt = np.zeros((len(samples), 1, dmax), dtype=np.float32)
        tm = np.zeros((len(samples), 1, dmax), dtype=bool)
        for i, s in enumerate(samples):
            d = s.target.shape[1]
            tgt[i, :, :d] = s.target
            tm[i, :, :d] = True
        batch.update(target=tgt, target_mask=tm)
    return batch


def grid_index_scalar(t: float, step: float) -> int:
    """``grid_index`` of one float (the same float64 products), without numpy: the
    engine's per-step group lookup."""
    k = math.ceil(t / step)
    if (k - 1) * step >= t:
        k -= 1
    if k * step < t:
        k += 1
    return k
