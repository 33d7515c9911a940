"""Scores used everywhere: R² (per dimension, then the mean), binned spike counts, and the
Neural Latents Benchmark's spiking scores (bits per spike, co-smoothing, forward
prediction, PSTH R²), computed exactly as ``nlb_tools.evaluation`` (0.0.4) computes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln

# nlb_tools replaces zero predicted rates by this before taking the log.
ZERO_RATE = 1e-9


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


def poisson_nll(rates: np.ndarray, spikes: np.ndarray) -> float:
    """Total Poisson negative log-likelihood ``sum(r - n·log r + log n!)``, in nats.

    Entries whose spike count is NaN are left out (NLB marks unobserved bins that way), so
    rates may be NaN there; everywhere else rates must be finite and >= 0, and a zero rate
    counts as ``ZERO_RATE`` (as nlb_tools' ``neg_log_likelihood``). Inputs are not changed.
    """
    rates = np.asarray(rates, dtype=np.float64)
    spikes = np.asarray(spikes, dtype=np.float64)
    if rates.shape != spikes.shape:
        raise ValueError(f"rates {rates.shape} and spikes {spikes.shape} must have one shape")
    observed = ~np.isnan(spikes)
    r, n = rates[observed], spikes[observed]  # (M,) copies: the caller's arrays stay as given
    if np.isnan(r).any():
        raise ValueError("NaN rate predicted where a spike count is observed (not NaN)")
    if (r < 0).any():
        raise ValueError("negative rate predicted; rates are expected counts per bin (>= 0)")
    r[r == 0] = ZERO_RATE
    return float(np.sum(r - n * np.log(r) + gammaln(n + 1.0)))


def bits_per_spike(rates: np.ndarray, spikes: np.ndarray) -> float:
    """Information gain of ``rates`` over each neuron's mean rate, per spike, in bits.

    rates, spikes: (..., N) expected and observed counts per bin, neurons on the last axis
    (NLB's (trials, time, neurons), or (time, neurons)); NaN spike counts are unobserved.
    The null model predicts each neuron's mean count over its observed bins (a silent
    neuron's null rate is 0, scored as ``ZERO_RATE``), and the gain ``NLL_null - NLL``
    is divided by the total spike count and ln 2: ``nlb_tools.evaluation.bits_per_spike``.
    """
    spikes = np.asarray(spikes, dtype=np.float64)
    if spikes.ndim < 1 or spikes.size == 0:
        raise ValueError(
            f"bits per spike needs a non-empty (..., neurons) array, got {spikes.shape}"
        )
    total = float(np.nansum(spikes))
    if total <= 0:
        raise ValueError("bits per spike is undefined without spikes: every observed count is 0")
    # Per-neuron mean over observed bins; a neuron with no observed bin gets NaN (quietly),
    # which only ever meets NaN spikes and is left out.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(spikes, axis=tuple(range(spikes.ndim - 1)), keepdims=True)
    null = np.broadcast_to(mean, spikes.shape)
    nll_model = poisson_nll(rates, spikes)
    nll_null = poisson_nll(null, spikes)
    return float((nll_null - nll_model) / total / np.log(2))


def co_smoothing_bps(heldout_rates: np.ndarray, heldout_spikes: np.ndarray) -> float:
    """Co-smoothing bits per spike: rates predicted for held-out units (from the held-in
    units' spiking) scored against those units' spikes; (..., N_heldout) each. NLB's
    ``co-bps``: the null is the held-out units' own mean rates over the scored bins."""
    return bits_per_spike(heldout_rates, heldout_spikes)


def forward_prediction_bps(
    rates: np.ndarray,
    spikes: np.ndarray,
    heldout_rates: np.ndarray | None = None,
    heldout_spikes: np.ndarray | None = None,
) -> float:
    """Forward-prediction bits per spike: rates predicted for bins after the input window
    (..., N) against their spikes. NLB's ``fp-bps`` scores held-in and held-out units
    together; pass the held-out parts too and they are joined on the unit (last) axis."""
    if (heldout_rates is None) != (heldout_spikes is None):
        raise ValueError("pass both heldout_rates and heldout_spikes, or neither")
    if heldout_rates is not None and heldout_spikes is not None:
        rates = np.concatenate([np.asarray(rates), np.asarray(heldout_rates)], axis=-1)
        spikes = np.concatenate([np.asarray(spikes), np.asarray(heldout_spikes)], axis=-1)
    return bits_per_spike(rates, spikes)


def _r2_uniform_average(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """R² per column averaged, with scikit-learn's ``r2_score`` rules for a constant column
    (1 if predicted exactly, else 0), which NLB's PSTH R² relies on."""
    sse = ((y_true - y_pred) ** 2).sum(0)  # (N,)
    sst = ((y_true - y_true.mean(0)) ** 2).sum(0)  # (N,)
    scores = np.ones(y_true.shape[1])
    valid = (sse != 0) & (sst != 0)
    scores[valid] = 1.0 - sse[valid] / sst[valid]
    scores[(sse != 0) & (sst == 0)] = 0.0
    return float(scores.mean())


def _shift_trial(rates: np.ndarray, shift: int) -> np.ndarray:
    """(T, N) trial rates moved ``shift`` bins later (NaN-filled), as NLB aligns jitter."""
    if shift == 0:
        return rates
    pad = np.full((abs(shift), rates.shape[1]), np.nan)
    if shift > 0:
        return np.vstack([pad, rates[:-shift]])
    return np.vstack([rates[-shift:], pad])


def psth_r2(
    psth: np.ndarray,
    rates: np.ndarray,
    cond_trials: Sequence[np.ndarray],
    jitter: np.ndarray | None = None,
) -> float:
    """R² of condition-averaged predicted rates against the true PSTHs, averaged over units.

    psth: (C, T, N) true PSTH per condition (NaN rows are bins outside the condition);
    rates: (trials, T, N) predicted rates; ``cond_trials[c]`` holds the trial indices of
    condition c (empty conditions are skipped); ``jitter`` (trials,) shifts each trial
    before averaging. The (condition, bin) rows of every condition are stacked and scored
    as one (rows, N) R², as ``nlb_tools.evaluation.eval_psth``.
    """
    psth = np.asarray(psth, dtype=np.float64)
    rates = np.asarray(rates, dtype=np.float64)
    if psth.ndim != 3 or rates.ndim != 3 or psth.shape[1:] != rates.shape[1:]:
        raise ValueError(
            f"psth (C, T, N) and rates (trials, T, N) must share T and N: {psth.shape}, "
            f"{rates.shape}"
        )
    if len(cond_trials) > len(psth):
        raise ValueError(f"{len(cond_trials)} conditions of trials but {len(psth)} PSTHs")
    shifts = np.zeros(len(rates), dtype=int) if jitter is None else np.asarray(jitter, int)
    true_rows, pred_rows = [], []
    for c, trials in enumerate(cond_trials):
        trials = np.asarray(trials, dtype=int)
        if trials.size == 0:
            continue
        pred = np.mean([_shift_trial(rates[i], int(shifts[i])) for i in trials], axis=0)
        inside = ~np.isnan(psth[c, :, 0])  # (T,)
        if np.isnan(pred[inside]).any():
            raise ValueError(
                f"condition {c}: NaN predicted rate inside the PSTH's bins (after jitter)"
            )
        true_rows.append(psth[c][inside])
        pred_rows.append(pred[inside])
    if not true_rows:
        raise ValueError("psth_r2 needs at least one condition with trials")
    return _r2_uniform_average(np.vstack(true_rows), np.vstack(pred_rows))
