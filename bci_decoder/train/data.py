"""Multi-session sampling of training sequences and windows.

Every batch is a pure function of (seed, step): a distributed run splits the same global
batch across ranks, so 2 processes see exactly what 1 process sees.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from bci_decoder.config import MtMSettings, SamplerSettings
from bci_decoder.data.session import Session
from bci_decoder.model.masking import collate_mtm, log_rate_prior, mask_window
from bci_decoder.tokenizer import (
    collate_causal,
    collate_window,
    grid_index,
    tokenize_causal,
    tokenize_window,
)
from bci_decoder.train.checkpoint import Normalizer


@dataclass
class SessionSource:
    """One session as the sampler sees it."""

    session: Session
    session_index: int  # in the session vocabulary
    unit_index: np.ndarray  # (U,) vocabulary index of each unit
    output: str
    output_index: int
    norm: Normalizer
    span: tuple[float, float]  # time range training samples come from

    def spikes(self) -> tuple[np.ndarray, np.ndarray]:
        """Spike times and vocabulary unit indices."""
        s = self.session
        return s.spike_times, self.unit_index[s.spike_units]


def boost_factors(session_ids: list[str], boost: dict[str, float]) -> np.ndarray:
    """Each session's factor from ``SamplerSettings.session_boost`` (the product of the
    factors of every glob it matches; 1 where none does). A glob that matches no session
    or a factor <= 0 is an error, not a silent no-op."""
    f = np.ones(len(session_ids))
    for pattern, factor in boost.items():
        if not factor > 0:
            raise ValueError(f"session_boost[{pattern!r}] must be > 0, not {factor}")
        hit = np.array([fnmatch.fnmatchcase(sid, pattern) for sid in session_ids], bool)
        if not hit.any():
            raise ValueError(f"session_boost pattern {pattern!r} matches no training session")
        f[hit] *= factor
    return f


class BatchSampler:
    def __init__(
        self,
        sources: list[SessionSource],
        step: float,
        context: float,
        cfg: SamplerSettings,
        seed: int = 0,
        modes: tuple[str, ...] = ("causal", "window"),
    ) -> None:
        self.sources, self.step, self.context, self.cfg, self.seed = (
            sources,
            step,
            context,
            cfg,
            seed,
        )
        self.modes = modes
        durations = np.array([s.span[1] - s.span[0] for s in sources])
        if np.any(durations <= cfg.sequence):
            short = [
                s.session.session_id
                for s, d in zip(sources, durations, strict=True)
                if d <= cfg.sequence
            ]
            raise ValueError(f"sessions shorter than one training sequence: {short}")
        w = np.sqrt(durations)  # long sessions get more, but not all, of the batches
        w = w * boost_factors([s.session.session_id for s in sources], cfg.session_boost)
        self.weights = w / w.sum()
        self._spikes = [s.spikes() for s in sources]

    def mode_of(self, step: int) -> str:
        if "window" not in self.modes:
            return "causal"
        if "causal" not in self.modes:
            return "window"
        rng = np.random.default_rng([self.seed, step, 7])
        return "window" if rng.random() < self.cfg.window_fraction else "causal"

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[str, dict]:
        """The rank's share of global batch ``step``."""
        mode = self.mode_of(step)
        # one session per batch: sessions differ ten-fold in spikes per group, and a mixed
        # batch pads every sample to the densest one
        j = int(
            np.random.default_rng([self.seed, step, 11]).choice(len(self.sources), p=self.weights)
        )
        idx = range(rank, self.cfg.batch_size, world)
        samples = [self._sample(mode, step, i, j) for i in idx]
        return mode, (collate_causal(samples) if mode == "causal" else collate_window(samples))

    def _drop_units(self, rng: np.random.Generator, times: np.ndarray, units: np.ndarray):
        if rng.random() >= self.cfg.unit_dropout:
            return times, units
        present = np.unique(units)
        keep_frac = rng.uniform(self.cfg.min_keep, 1.0)
        kept = present[rng.random(present.size) < keep_frac]
        m = np.isin(units, kept)
        return times[m], units[m]

    def _sample(self, mode: str, step: int, i: int, j: int):
        rng = np.random.default_rng([self.seed, step, i])
        src = self.sources[j]
        times, units = self._spikes[j]
        beh = src.session.behavior[src.output]
        lo, hi = src.span
        if mode == "causal":
            L, s = self.cfg.sequence, self.step
            G = int(round(L / s))
            k_lo, k_hi = int(grid_index(lo, s)), int(grid_index(hi - L, s)) - 1
            k0 = int(rng.integers(k_lo, max(k_hi, k_lo + 1)))
            t0, t1 = k0 * s, (k0 + G) * s
            a = np.searchsorted(times, t0, side="right")
            b = np.searchsorted(times, t1, side="right")
            st, su = self._drop_units(rng, times[a:b], units[a:b])
            bt = beh.timestamps
            qa = np.searchsorted(bt, t0 + self.cfg.burn_in, side="right")
            qb = np.searchsorted(bt, t1, side="right")
            q = np.arange(qa, qb)
            if q.size > self.cfg.max_queries:
                q = np.sort(rng.choice(q, self.cfg.max_queries, replace=False))
            sample = tokenize_causal(st, su, k0 + 1, G, s, bt[q])
            target = src.norm.forward(beh.data[q][sample.meta["query_keep"]])
        else:
            bt = beh.timestamps
            qa = np.searchsorted(bt, lo + self.context, side="left")
            qb = np.searchsorted(bt, hi, side="left")
            q = int(rng.integers(qa, max(qb, qa + 1)))
            t = bt[q]
            a = np.searchsorted(times, t - self.context, side="right")
            b = np.searchsorted(times, t, side="right")
            st, su = self._drop_units(rng, times[a:b], units[a:b])
            sample = tokenize_window(st, su, t, self.context, self.step)
            target = src.norm.forward(beh.data[q : q + 1])
        sample.session = src.session_index
        sample.output = src.output_index
        sample.target = target.astype(np.float32)
        sample.target_mask = np.ones_like(sample.target, dtype=bool)
        return sample


# ---------------------------------------------------------------- masked objective (MtM)
@dataclass
class MtMSource:
    """One session as the masked objective sees it: spiking only, behaviour not needed."""

    session: Session
    session_index: int
    unit_index: np.ndarray  # (U,) vocabulary index of each unit
    span: tuple[float, float]  # time range masked windows come from

    @property
    def regions(self) -> np.ndarray:
        """(U,) int code of each unit's brain area."""
        return np.unique(np.asarray(self.session.brain_areas), return_inverse=True)[1]

    def log_prior(self) -> np.ndarray:
        """(U,) log mean rate (Hz) of each unit over ``span`` (spiking only)."""
        s = self.session
        return log_rate_prior(s.spike_times, s.spike_units, s.num_units, self.span)


class MtMSampler:
    """Masked windows for the MtM objective; every batch is a pure function of (seed, step).

    One session and one scheme per batch (the scheme's prompt is the batch's)."""

    def __init__(
        self,
        sources: list[MtMSource],
        latent_step: float,
        window: float,
        settings: MtMSettings,
        seed: int = 0,
    ) -> None:
        self.sources, self.latent_step, self.window = sources, latent_step, window
        self.settings, self.seed = settings, seed
        for s in sources:
            if s.span[1] - s.span[0] <= window:
                raise ValueError(
                    f"session {s.session.session_id}: span shorter than one {window} s window"
                )
        durations = np.array([s.span[1] - s.span[0] for s in sources])
        w = np.sqrt(durations)
        self.weights = w / w.sum()
        names = [k for k, v in settings.schemes.items() if v > 0]
        p = np.array([settings.schemes[k] for k in names], dtype=np.float64)
        self.schemes, self.scheme_p = names, p / p.sum()
        self._regions = [s.regions for s in sources]
        self._priors = [s.log_prior() for s in sources]

    def batch(self, step: int) -> tuple[str, dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.seed, step, 23])
        j = int(rng.choice(len(self.sources), p=self.weights))
        scheme = str(rng.choice(self.schemes, p=self.scheme_p))
        src = self.sources[j]
        s = src.session
        lo, hi = src.span
        samples = []
        for i in range(self.settings.batch_size):
            r = np.random.default_rng([self.seed, step, i, 29])
            t_end = float(r.uniform(lo + self.window, hi))
            sample = mask_window(
                s.spike_times,
                s.spike_units,
                src.unit_index,
                self._regions[j],
                t_end,
                self.window,
                self.latent_step,
                self.settings.bin_width,
                scheme,
                r,
                ratio=self.settings.mask_ratio,
                forward_s=self.settings.forward_s,
                log_prior=self._priors[j],
            )
            sample.session = src.session_index
            samples.append(sample)
        return scheme, collate_mtm(samples)
