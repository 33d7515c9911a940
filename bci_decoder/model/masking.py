"""Masking schemes of the masked objective (MtM): what a window hides and what is scored.

A window (t - W, t] is cut into bins of ``bin_width``; the targets are the spike counts of
every (unit, bin) pair. A scheme hides some pairs: their spikes are removed from the input
and the model is told which pairs are hidden (the marker of ``POYO.forward_mtm``), so a
hidden unit is never confused with a silent one. The loss scores hidden pairs only.

- ``neuron``: a fraction of the units, in every bin.
- ``temporal``: a fraction of the bins, for every unit.
- ``causal``: the last ``forward_bins`` bins, for every unit (forward prediction: an output
  in a hidden bin uses only spikes before the cut, so at or before its own time).
- ``intra_region``: one region is kept, every other region is hidden; a fraction of the kept
  region's units is hidden too and scored (prediction from the same region).
- ``inter_region``: one region is hidden entirely and scored (prediction from the others).

With a single region the two region schemes fall back to ``neuron`` (nothing else to mean).
numpy only: the same code serves training, evaluation and calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bci_decoder.subjects import unit_rates_hz

SCHEMES = ("neuron", "temporal", "causal", "intra_region", "inter_region")


@dataclass
class MtMSample:
    """One masked window. U units read out, T bins, K latent groups, N visible spikes."""

    spike_unit: np.ndarray  # (N,) int64 vocabulary index of the visible spikes
    spike_time: np.ndarray  # (N,) float64
    latent_time: np.ndarray  # (K,) float64
    units: np.ndarray  # (U,) int64 vocabulary index of the units read out
    bin_time: np.ndarray  # (T,) float64 bin centres
    counts: np.ndarray  # (U, T) float32 spike counts (all spikes, hidden or not)
    hidden: np.ndarray  # (U, T) bool: spikes removed from the input
    scored: np.ndarray  # (U, T) bool: loss entries
    marker: np.ndarray  # (K, U) float32: share of group k's span where unit u is hidden
    scheme: int  # index into SCHEMES
    session: int = 0
    t_end: float = 0.0
    log_prior: np.ndarray | None = None  # (U,) float32 log mean rate (Hz) of each unit


DEFAULT_LOG_RATE = float(np.log(10.0))  # a unit's log-rate (Hz) prior when none is given


def log_rate_prior(
    spike_times: np.ndarray, spike_units: np.ndarray, num_units: int, span: tuple[float, float]
) -> np.ndarray:
    """(U,) float32 log mean rate (Hz) of each unit over ``span``, from spikes sorted by time
    (half a spike added so a silent unit's prior is finite). Spiking only: what a masked
    readout may know of a unit without seeing the window's hidden entries."""
    rates = unit_rates_hz(spike_times, np.asarray(spike_units), num_units, span)
    return np.log(rates + 0.5 / max(span[1] - span[0], 1e-9)).astype(np.float32)


def bin_index(times: np.ndarray, t_end: float, window: float, bin_width: float) -> np.ndarray:
    """Bin of each time in (t_end - window, t_end]: bin b covers (start + b·w, start + (b+1)·w]."""
    start = t_end - window
    return np.ceil((np.asarray(times, np.float64) - start) / bin_width).astype(np.int64) - 1


def draw_mask(
    rng: np.random.Generator,
    scheme: str,
    regions: np.ndarray,
    num_bins: int,
    ratio: float,
    forward_bins: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Hidden and scored (U, T) bool masks of one scheme; ``regions`` (U,) int codes."""
    regions = np.asarray(regions)
    U = regions.size
    hidden = np.zeros((U, num_bins), dtype=bool)
    names = np.unique(regions)
    if scheme in ("intra_region", "inter_region") and names.size < 2:
        scheme = "neuron"

    def some_units(pool: np.ndarray) -> np.ndarray:
        k = max(1, int(round(ratio * pool.size)))
        return rng.choice(pool, size=min(k, max(pool.size - 1, 1)), replace=False)

    if scheme == "neuron":
        hidden[some_units(np.arange(U))] = True
        return hidden, hidden.copy()
    if scheme == "temporal":
        k = max(1, int(round(ratio * num_bins)))
        hidden[:, rng.choice(num_bins, size=k, replace=False)] = True
        return hidden, hidden.copy()
    if scheme == "causal":
        hidden[:, num_bins - min(forward_bins, num_bins - 1) :] = True
        return hidden, hidden.copy()
    region = rng.choice(names)
    inside = np.flatnonzero(regions == region)
    if scheme == "inter_region":
        hidden[inside] = True
        return hidden, hidden.copy()
    if scheme == "intra_region":
        scored = np.zeros_like(hidden)
        scored[some_units(inside)] = True
        hidden[regions != region] = True
        return hidden | scored, scored
    raise ValueError(f"unknown masking scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def group_overlap(
    t_end: float, window: float, latent_step: float, bin_width: float
) -> tuple[np.ndarray, np.ndarray]:
    """Latent times (K,) and the share of each group's span that each bin covers (K, T)."""
    K = int(round(window / latent_step))
    T = int(round(window / bin_width))
    start = t_end - window
    g_lo = start + latent_step * np.arange(K)
    b_lo = start + bin_width * np.arange(T)
    lo = np.maximum(g_lo[:, None], b_lo[None, :])
    hi = np.minimum(g_lo[:, None] + latent_step, b_lo[None, :] + bin_width)
    latent_time = start + latent_step * np.arange(1, K + 1, dtype=np.float64)
    return latent_time, (np.clip(hi - lo, 0.0, None) / latent_step).astype(np.float32)


def mask_window(
    times: np.ndarray,
    local_units: np.ndarray,
    unit_vocab: np.ndarray,
    regions: np.ndarray,
    t_end: float,
    window: float,
    latent_step: float,
    bin_width: float,
    scheme: str,
    rng: np.random.Generator,
    ratio: float = 0.3,
    forward_s: float = 0.2,
    always_hidden: np.ndarray | None = None,
    fixed: tuple[np.ndarray, np.ndarray] | None = None,
    log_prior: np.ndarray | None = None,
) -> MtMSample:
    """Mask the window (t_end - window, t_end] of one session.

    times (N,), local_units (N,) index into the session's units; unit_vocab (U,) their
    vocabulary indices; regions (U,) int codes. ``always_hidden`` (U,) bool: units hidden
    and scored in every bin whatever the scheme (held-out units of an evaluation).
    ``fixed``: (hidden, scored) (U, T) masks to use instead of drawing the scheme's (an
    evaluation's masks; ``scheme`` then only names the prompt). ``log_prior`` (U,): each
    unit's log mean rate (``log_rate_prior``), for models that read it (``mtm_rate_prior``).
    """
    times = np.asarray(times, np.float64)
    local_units = np.asarray(local_units, np.int64)
    lo = np.searchsorted(times, t_end - window, side="right")
    hi = np.searchsorted(times, t_end, side="right")
    times, local_units = times[lo:hi], local_units[lo:hi]
    U = len(unit_vocab)
    T = int(round(window / bin_width))
    if abs(T * bin_width - window) > 1e-9:
        raise ValueError(f"window {window} s is not a whole number of {bin_width} s bins")
    b = np.clip(bin_index(times, t_end, window, bin_width), 0, T - 1)
    counts = np.zeros((U, T), dtype=np.float32)
    np.add.at(counts, (local_units, b), 1.0)
    if fixed is None:
        hidden, scored = draw_mask(
            rng, scheme, regions, T, ratio, int(round(forward_s / bin_width))
        )
    else:
        hidden, scored = (np.array(m, dtype=bool) for m in fixed)
        if hidden.shape != (U, T) or scored.shape != (U, T):
            raise ValueError(f"fixed masks must be ({U}, {T}), got {hidden.shape}")
    if always_hidden is not None:
        hidden[always_hidden] = True
        scored[always_hidden] = True
    keep = ~hidden[local_units, b]
    latent_time, overlap = group_overlap(t_end, window, latent_step, bin_width)
    return MtMSample(
        spike_unit=np.asarray(unit_vocab, np.int64)[local_units[keep]],
        spike_time=times[keep],
        latent_time=latent_time,
        units=np.asarray(unit_vocab, np.int64),
        bin_time=t_end - window + bin_width * (np.arange(T) + 0.5),
        counts=counts,
        hidden=hidden,
        scored=scored,
        marker=overlap @ hidden.T.astype(np.float32),
        scheme=SCHEMES.index(scheme),
        t_end=float(t_end),
        log_prior=None if log_prior is None else np.asarray(log_prior, np.float32),
    )


def collate_mtm(samples: list[MtMSample]) -> dict[str, np.ndarray]:
    """Stack masked windows (same window and bins) into a batch; units padded and unscored."""
    B = len(samples)
    N = max(max(len(s.spike_time) for s in samples), 1)
    U = max(len(s.units) for s in samples)
    K, T = samples[0].marker.shape[0], samples[0].counts.shape[1]
    batch = {
        "spike_unit": np.zeros((B, N), np.int64),
        "spike_time": np.zeros((B, N), np.float64),
        "spike_mask": np.zeros((B, N), bool),
        "latent_time": np.stack([s.latent_time for s in samples]),
        "session": np.array([s.session for s in samples], np.int64),
        "mtm_units": np.zeros((B, U), np.int64),
        "mtm_marker": np.zeros((B, K, U), np.float32),
        "mtm_bin_time": np.stack([s.bin_time for s in samples]),
        "mtm_scheme": np.array([s.scheme for s in samples], np.int64),
        "mtm_log_prior": np.full((B, U), DEFAULT_LOG_RATE, np.float32),
        "mtm_counts": np.zeros((B, U, T), np.float32),
        "mtm_hidden": np.zeros((B, U, T), bool),
        "mtm_scored": np.zeros((B, U, T), bool),
    }
    for i, s in enumerate(samples):
        n, u = len(s.spike_time), len(s.units)
        batch["spike_unit"][i, :n] = s.spike_unit
        batch["spike_time"][i] = s.t_end  # padded spikes sit at the window's end, masked
        batch["spike_time"][i, :n] = s.spike_time
        batch["spike_mask"][i, :n] = True
        batch["mtm_units"][i, :u] = s.units
        batch["mtm_marker"][i, :, :u] = s.marker
        batch["mtm_counts"][i, :u] = s.counts
        batch["mtm_hidden"][i, :u] = s.hidden
        batch["mtm_scored"][i, :u] = s.scored
        if s.log_prior is not None:
            batch["mtm_log_prior"][i, :u] = s.log_prior
    return batch


MTM_KEYS = (
    "spike_unit spike_time spike_mask latent_time session mtm_units mtm_marker mtm_bin_time "
    "mtm_scheme mtm_log_prior"
).split()
