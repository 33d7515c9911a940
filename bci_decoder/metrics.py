"""Scores used everywhere: R² (per dimension, then the mean), and binned spike counts."""

from __future__ import annotations

import numpy as np


def r2_per_dim(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """1 - SSE/SST for each output dimension; inputs (T, D)."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: {y_true.shape} vs {y_pred.shape}")
    sse = ((y_true - y_pred) ** 2).sum(0)
    sst = ((y_true - y_true.mean(0)) ** 2).sum(0)
    return 1.0 - sse / np.maximum(sst, 1e-12)


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The project's R²: per-dimension R², averaged over dimensions."""
    return float(r2_per_dim(y_true, y_pred).mean())


def binned_counts(
    spike_times: np.ndarray,
    spike_units: np.ndarray,
    num_units: int,
    bin_ends: np.ndarray,
    bin_width: float,
    num_lags: int = 1,
) -> np.ndarray:
    """Counts per unit in causal bins ending at each time: (T, num_lags, U) float32.

    Lag k (0-based) counts spikes in (end - (k+1)·w, end - k·w], so lag 0 is the bin that
    ends at ``bin_ends[i]`` and no spike after it is ever used (the live-decoding rule).
    """
    bin_ends = np.asarray(bin_ends, dtype=np.float64)
    out = np.zeros((len(bin_ends), num_lags, num_units), dtype=np.float32)
    order = np.lexsort((spike_times, spike_units))
    t_sorted = spike_times[order]
    u_sorted = spike_units[order]
    bounds = np.searchsorted(u_sorted, np.arange(num_units + 1))
    edges = bin_ends[:, None] - bin_width * np.arange(num_lags + 1)[None, :]  # (T, K+1)
    for u in range(num_units):
        tu = t_sorted[bounds[u] : bounds[u + 1]]
        if tu.size == 0:
            continue
        cum = np.searchsorted(tu, edges, side="right")  # spikes <= edge
        out[:, :, u] = cum[:, :-1] - cum[:, 1:]
    return out
