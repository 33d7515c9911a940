"""``bci-decoder evaluate-ssl``: what the masked objective learned, in bits per spike.

On each session's test part (the last 30%), tiled into windows of the model's context:

- **co-smoothing**: 20% of the units (fixed seed) hidden in every bin and predicted from the
  others (NLB's co-bps, the null being the held-out units' own mean rates);
- **forward prediction**: the last ``forward_s`` (200 ms) of each window hidden for every unit
  and predicted from what came before (fp-bps);
- **region prediction** (sessions with two or more brain areas): each region hidden in
  turn and predicted from the other regions.

Each model is asked with the prompt of the task's scheme (``neuron``, ``causal``,
``inter_region``) when it was trained with that scheme, else with the one scheme it knows
(a temporal-only model answers every task with its ``temporal`` prompt). The smoothing
baseline is NLB's: Gaussian-smoothed counts of the visible units (or the visible past),
then a Poisson GLM per predicted unit fitted on the training part.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d
from scipy.signal import lfilter

from bci_decoder.data.session import Session, time_split
from bci_decoder.decode import to_torch
from bci_decoder.metrics import bits_per_spike, co_smoothing_bps, forward_prediction_bps
from bci_decoder.model.masking import (
    MTM_KEYS,
    SCHEMES,
    collate_mtm,
    log_rate_prior,
    mask_window,
)
from bci_decoder.train.checkpoint import Decoder

TASKS = ("co_smoothing", "forward", "region")
TASK_SCHEME = {"co_smoothing": "neuron", "forward": "causal", "region": "inter_region"}


@dataclass
class SSLEvalSettings:
    heldout_fraction: float = 0.2
    heldout_seed: int = 0
    bin_width: float = 0.02
    forward_s: float = 0.2
    window: float | None = None  # None: the (first) model's context
    # the smoothing baseline's kernel sd (s) and GLM ridge: each combination is fitted on the
    # first 80% of the training part and the one with the best Poisson likelihood on the
    # rest is refitted on all of it (NLB tunes its smoothing baseline by cross-validation too)
    smooth_sd_s: tuple[float, ...] = (0.025, 0.05, 0.1)
    glm_l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    max_windows: int = 120  # test windows per session, at most (evenly spread)
    batch_size: int = 16
    fixed: dict[str, Any] = field(default_factory=dict)


def heldout_units(num_units: int, fraction: float, seed: int) -> np.ndarray:
    """(U,) bool: the co-smoothing held-out units (a fixed draw per seed and unit count)."""
    rng = np.random.default_rng([seed, num_units])
    k = max(1, int(round(fraction * num_units)))
    out = np.zeros(num_units, dtype=bool)
    out[rng.choice(num_units, size=k, replace=False)] = True
    return out


def _regions(session: Session) -> np.ndarray:
    return np.unique(np.asarray(session.brain_areas), return_inverse=True)[1]


def test_windows(session: Session, window: float, max_windows: int) -> np.ndarray:
    """Ends of non-overlapping windows tiling the test part (at most ``max_windows``)."""
    lo, hi = time_split(session).test
    ends = lo + window * np.arange(1, int((hi - lo) // window) + 1)
    if ends.size > max_windows:
        ends = ends[np.linspace(0, ends.size - 1, max_windows).round().astype(int)]
    return ends


def task_masks(
    task: str, session: Session, T: int, st: SSLEvalSettings
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(hidden, scored) (U, T) masks of one task: one pair, or one per region."""
    U = session.num_units
    if task == "co_smoothing":
        h = np.repeat(heldout_units(U, st.heldout_fraction, st.heldout_seed)[:, None], T, 1)
        return [(h, h)]
    if task == "forward":
        h = np.zeros((U, T), dtype=bool)
        h[:, T - int(round(st.forward_s / st.bin_width)) :] = True
        return [(h, h)]
    if task == "region":
        reg = _regions(session)
        return [(np.repeat((reg == r)[:, None], T, 1),) * 2 for r in np.unique(reg)]
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def model_rates(
    decoder: Decoder,
    session: Session,
    ends: np.ndarray,
    masks: list[tuple[np.ndarray, np.ndarray]],
    scheme: str,
    st: SSLEvalSettings,
    window: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Expected counts and spike counts of the scored entries: (W, T, U) each, NaN where not
    scored by any of ``masks``."""
    sid = session.session_id
    if sid not in decoder.sessions:
        raise KeyError(f"session {sid!r} is not one this model knows; calibrate it first")
    unit_index = decoder.units.session_units(sid, session.unit_ids)
    reg = _regions(session)
    U, T = session.num_units, int(round(window / st.bin_width))
    # each unit's mean rate over the training part: NLB gives the held-out units' training
    # data too (the smoothing baseline fits its GLM on it)
    prior = log_rate_prior(session.spike_times, session.spike_units, U, time_split(session).fit)
    rates = np.full((len(ends), T, U), np.nan)
    counts = np.full((len(ends), T, U), np.nan)
    model = decoder.model
    model.eval()
    for hidden, scored in masks:
        for a in range(0, len(ends), st.batch_size):
            samples = []
            for t_end in ends[a : a + st.batch_size]:
                s = mask_window(
                    session.spike_times,
                    session.spike_units,
                    unit_index,
                    reg,
                    float(t_end),
                    window,
                    decoder.config.latent_step,
                    st.bin_width,
                    scheme,
                    np.random.default_rng(0),
                    fixed=(hidden, scored),
                    log_prior=prior,
                )
                s.session = decoder.sessions[sid]
                samples.append(s)
            batch = collate_mtm(samples)
            with torch.no_grad():
                log_rate = model(mode="mtm", **to_torch(batch, MTM_KEYS)).numpy()
            mu = np.exp(log_rate[:, :U]) * st.bin_width  # (b, U, T) expected counts
            sel = scored.T  # (T, U)
            for i in range(len(samples)):
                w = a + i
                rates[w][sel] = mu[i].T[sel]
                counts[w][sel] = batch["mtm_counts"][i, :U].T[sel]
    return rates, counts


# ---------------------------------------------------------------- smoothing baseline
def binned_session(session: Session, bin_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Counts (N, U) of the whole session in bins (start + b·w, start + (b+1)·w], and the
    bin ends (N,)."""
    start, stop = session.domain
    n = int(np.ceil((stop - start) / bin_width - 1e-6))
    ends = start + bin_width * np.arange(1, n + 1)
    b = np.ceil((session.spike_times - start) / bin_width).astype(np.int64) - 1
    ok = (b >= 0) & (b < n)
    counts = np.zeros((n, session.num_units), dtype=np.float64)
    np.add.at(counts, (b[ok], session.spike_units[ok]), 1.0)
    return counts, ends


def fit_poisson_glm(
    x: np.ndarray, y: np.ndarray, l2: float, iters: int = 100
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Poisson GLM with log link, one output per column of y: x (N, F), y (N, O).

    Returns (weights (F, O), bias (O,), feature mean, feature sd) for ``glm_predict``."""
    mean, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / sd).float()
    yt = torch.from_numpy(y).float()
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.log(yt.mean(0).clamp(min=1e-4)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        eta = (xt @ w + b).clamp(max=20)
        loss = (torch.exp(eta) - yt * eta).mean() + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy(), mean, sd


def glm_predict(model: tuple, x: np.ndarray) -> np.ndarray:
    w, b, mean, sd = model
    return np.exp(np.clip(((x - mean) / sd) @ w + b, None, 20))


def poisson_nll(rates: np.ndarray, counts: np.ndarray) -> float:
    """Mean Poisson negative log-likelihood (constant term left out) of expected counts."""
    r = np.clip(rates, 1e-9, None)
    return float(np.mean(r - counts * np.log(r)))


def tuned_glm(
    features: Callable[[float], np.ndarray],
    target: np.ndarray,
    rows: np.ndarray,
    st: SSLEvalSettings,
) -> tuple[tuple, np.ndarray]:
    """The smoothing baseline's GLM with its kernel sd and ridge chosen on held-back rows.

    features(sd_s) -> (N, F) smoothed inputs of every bin; target (N, O) counts; rows (R,)
    the training bins. Each (sd, l2) is fitted on the first 80% of ``rows`` and scored on the
    rest; the best is refitted on all ``rows``. Returns (glm, features of the chosen sd)."""
    cut = max(1, int(0.8 * len(rows)))
    fit, val = rows[:cut], rows[cut:]
    grid = [(sd_s, l2) for sd_s in st.smooth_sd_s for l2 in st.glm_l2]
    best = (np.inf, *grid[0])
    if len(grid) > 1 and len(val):
        for sd_s in st.smooth_sd_s:
            x = features(sd_s)
            for l2 in st.glm_l2:
                glm = fit_poisson_glm(x[fit], target[fit], l2)
                best = min(best, (poisson_nll(glm_predict(glm, x[val]), target[val]), sd_s, l2))
    x = features(best[1])
    return fit_poisson_glm(x[rows], target[rows], best[2]), x


def smoothing_rates(
    task: str,
    session: Session,
    ends: np.ndarray,
    masks: list[tuple[np.ndarray, np.ndarray]],
    st: SSLEvalSettings,
    window: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The smoothing baseline's expected counts for the same entries as ``model_rates``."""
    counts, bin_ends = binned_session(session, st.bin_width)
    T = int(round(window / st.bin_width))
    train_lo, train_hi = time_split(session).fit
    train = (bin_ends > train_lo + window) & (bin_ends <= train_hi)
    U = session.num_units
    rates = np.full((len(ends), T, U), np.nan)
    obs = np.full((len(ends), T, U), np.nan)
    last = np.searchsorted(bin_ends, ends - 1e-9)  # index of each window's last bin
    rows = last[:, None] - (T - 1) + np.arange(T)[None, :]  # (W, T) bins of each window
    for hidden, scored in masks:
        if task == "forward":
            f = int(round(st.forward_s / st.bin_width))

            def ema(sd_s: float) -> np.ndarray:
                # causal smoothing of the visible past: exponential kernel, state at the cut
                alpha = 1.0 / max(sd_s / st.bin_width, 1.0)
                return lfilter([alpha], [1.0, alpha - 1.0], counts, axis=0)  # (N, U)

            cut = np.flatnonzero(train)[:: max(1, f)]
            cut = cut[cut + f < len(counts)]
            future = np.zeros_like(counts)  # (N, U) mean count of the f bins after each bin
            future[cut] = np.stack([counts[c + 1 : c + 1 + f].mean(0) for c in cut])
            glm, x = tuned_glm(ema, future, cut, st)
            pred = glm_predict(glm, x[rows[:, T - f - 1]])  # (W, U) per bin
            for w in range(len(ends)):
                rates[w, T - f :] = pred[w]
                obs[w, T - f :] = counts[rows[w, T - f :]]
            continue
        visible = ~hidden[:, 0]
        target = scored[:, 0]

        def smooth(sd_s: float, visible: np.ndarray = visible) -> np.ndarray:
            return gaussian_filter1d(
                counts[:, visible], sd_s / st.bin_width, axis=0, mode="nearest"
            )

        glm, x = tuned_glm(smooth, counts[:, target], np.flatnonzero(train), st)
        pred = glm_predict(glm, x[rows.reshape(-1)]).reshape(len(ends), T, -1)
        rates[:, :, target] = pred
        obs[:, :, target] = counts[rows][:, :, target]
    return rates, obs


# ---------------------------------------------------------------- the report
def _score(task: str, rates: np.ndarray, counts: np.ndarray) -> float:
    """bps of the scored (non-NaN) entries, flattened to (bins, units)."""
    keep = ~np.isnan(counts).all(axis=(0, 1))  # units scored at all
    r = rates[:, :, keep].reshape(-1, keep.sum())
    n = counts[:, :, keep].reshape(-1, keep.sum())
    rows = ~np.isnan(n).all(1)
    r, n = r[rows], n[rows]
    r = np.where(np.isnan(n), np.nan, r)
    if task == "co_smoothing":
        return co_smoothing_bps(r, n)
    if task == "forward":
        return forward_prediction_bps(r, n)
    return bits_per_spike(r, n)


def trained_schemes(decoder: Decoder) -> list[str]:
    """The schemes a model was trained with (positive weight in its mtm settings)."""
    mtm = decoder.info.get("train_config", {}).get("mtm") or {}
    return [k for k, v in (mtm.get("schemes") or {}).items() if v > 0] or list(SCHEMES)


def evaluate_ssl(
    models: dict[str, Decoder],
    sessions: list[Session],
    settings: SSLEvalSettings | None = None,
    smoothing: bool = True,
) -> dict[str, Any]:
    """Scores of each model (and the smoothing baseline) per session and task, in bps."""
    st = settings or SSLEvalSettings()
    first = next(iter(models.values()))
    window = st.window or first.config.context
    results: dict[str, dict[str, dict[str, float]]] = {}
    names = list(models) + (["smoothing"] if smoothing else [])
    for s in sessions:
        ends = test_windows(s, window, st.max_windows)
        T = int(round(window / st.bin_width))
        tasks = [t for t in TASKS if t != "region" or len(set(s.brain_areas)) > 1]
        row: dict[str, dict[str, float]] = {n: {} for n in names}
        for task in tasks:
            masks = task_masks(task, s, T, st)
            for name, dec in models.items():
                known = trained_schemes(dec)
                scheme = TASK_SCHEME[task] if TASK_SCHEME[task] in known else known[0]
                r, n = model_rates(dec, s, ends, masks, scheme, st, window)
                row[name][task] = _score(task, r, n)
            if smoothing:
                r, n = smoothing_rates(task, s, ends, masks, st, window)
                row["smoothing"][task] = _score(task, r, n)
        results[s.session_id] = row
    mean = {
        n: {
            t: float(np.mean([results[s][n][t] for s in results if t in results[s][n]]))
            for t in TASKS
            if any(t in results[s][n] for s in results)
        }
        for n in names
    }
    return {
        "settings": asdict(st) | {"window": window},
        "sessions": results,
        "mean": mean,
    }


def format_table(report: dict[str, Any]) -> str:
    """Rows: session x model; columns: the tasks (bits per spike)."""
    lines = [f"{'session':<20} {'model':<16} " + " ".join(f"{t:>13}" for t in TASKS)]
    for sid, row in list(report["sessions"].items()) + [("mean", report["mean"])]:
        for name, scores in row.items():
            cells = " ".join(f"{scores[t]:>13.4f}" if t in scores else f"{'-':>13}" for t in TASKS)
            lines.append(f"{sid:<20} {name:<16} {cells}")
    return "\n".join(lines)


def dump(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1)
