"""Baseline decoders (Wiener, Kalman, GRU) and one function that scores them on a session.

All three see the same strictly causal features: the prediction at behaviour timestamp t
is built from spike counts in bins ending at t (``binned_counts`` with ``bin_ends`` = the
timestamps), so no spike after t is used, as in live decoding.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bci_decoder.baselines.gru import GRUDecoder
from bci_decoder.baselines.kalman import KalmanFilter
from bci_decoder.baselines.wiener import WienerFilter
from bci_decoder.data.session import Session
from bci_decoder.metrics import binned_counts, r2_score

__all__ = [
    "GRUDecoder",
    "KalmanFilter",
    "WienerFilter",
    "bin_width_for",
    "causal_features",
    "evaluate_baselines",
]

BASELINES: tuple[str, ...] = ("wiener", "kalman", "gru")
MIN_BIN_WIDTH = 0.05  # behaviour sampled faster than this gets overlapping 50 ms bins


def bin_width_for(timestamps: np.ndarray) -> float:
    """Bin width matching the behaviour's sampling step (rounded to 1 ms, at least 50 ms).

    Real files jitter around their nominal step (e.g. 49.5-50.5 ms), so the median step
    is rounded; faster-sampled behaviour (10 ms simulations) still gets 50 ms bins.
    """
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if len(timestamps) < 2:
        return MIN_BIN_WIDTH
    step = round(float(np.median(np.diff(timestamps))), 3)
    return max(step, MIN_BIN_WIDTH)


def causal_features(
    session: Session, timestamps: np.ndarray, num_lags: int, bin_width: float
) -> np.ndarray:
    """(T, num_lags, U) spike counts in bins ending at each timestamp, lag 0 first."""
    return binned_counts(
        session.spike_times,
        session.spike_units,
        session.num_units,
        bin_ends=timestamps,
        bin_width=bin_width,
        num_lags=num_lags,
    )


def _make(name: str, seed: int, kwargs: dict[str, Any]) -> WienerFilter | KalmanFilter | GRUDecoder:
    if name == "wiener":
        return WienerFilter(**kwargs)
    if name == "kalman":
        return KalmanFilter(**kwargs)
    if name == "gru":
        return GRUDecoder(**{"seed": seed, **kwargs})
    raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")


def _num_lags(model: WienerFilter | KalmanFilter | GRUDecoder) -> int:
    return getattr(model, "num_lags", 1)


def evaluate_baselines(
    session: Session,
    output: str,
    fit_range: tuple[float, float],
    test_range: tuple[float, float],
    which: Sequence[str] = BASELINES,
    seed: int = 0,
    model_kwargs: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Fit each baseline on the behaviour samples in ``fit_range`` and score ``test_range``.

    Ranges are half-open [start, stop) over behaviour timestamps. Features may reach back
    before a range's start (spike history), never past the sample's own timestamp.

    Returns ``{"timestamps": (T_test,), "target": (T_test, D), "bin_width": float,
    name: {"r2": float, "pred": (T_test, D), "fit_s": float}, ...}`` for each name in
    ``which``; the GRU entry also carries ``epochs``, ``best_epoch`` and ``valid_r2`` (on
    the fit range's last 10%, which it stops early on: the score to tune by).
    ``model_kwargs`` overrides constructor defaults per baseline (e.g. fewer GRU epochs
    in tests); leave it out to get the baselines as benchmarked.
    """
    beh = session.behavior[output]
    ts = beh.timestamps  # (T,)
    fit_mask = (ts >= fit_range[0]) & (ts < fit_range[1])
    test_mask = (ts >= test_range[0]) & (ts < test_range[1])
    if fit_mask.sum() < 2 or test_mask.sum() < 1:
        raise ValueError(
            f"{session.session_id}: {int(fit_mask.sum())} fit and {int(test_mask.sum())} "
            f"test samples of {output!r} in the given ranges"
        )
    bw = bin_width_for(ts)
    model_kwargs = model_kwargs or {}
    models = {name: _make(name, seed, dict(model_kwargs.get(name, {}))) for name in which}
    lags = max(_num_lags(m) for m in models.values())
    X_fit = causal_features(session, ts[fit_mask], lags, bw)  # (T_fit, K, U)
    X_test = causal_features(session, ts[test_mask], lags, bw)  # (T_test, K, U)
    Y_fit = beh.data[fit_mask].astype(np.float64)  # (T_fit, D)
    Y_test = beh.data[test_mask].astype(np.float64)  # (T_test, D)

    result: dict[str, Any] = {"timestamps": ts[test_mask], "target": Y_test, "bin_width": bw}
    for name, model in models.items():
        t0 = time.perf_counter()
        model.fit(X_fit, Y_fit)
        fit_s = time.perf_counter() - t0
        pred = np.asarray(model.predict(X_test), dtype=np.float64)  # (T_test, D)
        entry: dict[str, Any] = {"r2": r2_score(Y_test, pred), "pred": pred, "fit_s": fit_s}
        if isinstance(model, GRUDecoder):
            entry["epochs"] = model.epochs_run
            entry["best_epoch"] = model.best_epoch
            entry["valid_r2"] = model.valid_r2
        result[name] = entry
    return result
