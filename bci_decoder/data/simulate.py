"""Simulated M1-like sessions: reaching kinematics and tuned, spiking units.

Each session has its own hand trajectory and its own unit population (no unit
correspondence between sessions). The model, per session:

- **Behaviour.** The hand moves between targets on minimum-jerk trajectories (bell-shaped
  speed profiles), with random hold and reaction times and a little smooth motor noise.
  ``center_out``: from the centre to one of 8 targets on a circle and back (targets in
  shuffled blocks of 8; one trial per out-and-back). ``random_target``: sequential reaches
  to random points in a disc (one trial per reach, ``target_id`` -1). ``mixed``: sessions
  alternate, even indices center-out and odd indices random-target. Sampled at
  ``behavior_rate_hz`` as ``hand_pos`` (cm) and ``hand_vel`` (cm/s, the exact derivative).
- **Tuning.** Log-linear (exponential) rates: for unit i at time t, with the kinematics
  taken at t + ``neural_lead_s`` (motor cortex leads movement),
  ``log λ_i = log b_i + d_i·(v·u_i)/v_ref + s_i·|v|/v_ref + c_i·(p·w_i)/p_ref
  + l_i·z(t) + drift_i(t)``: cosine tuning to velocity direction ``u_i`` (random preferred
  direction), a speed gain, a slight position term, shared nuisance latents ``z`` (slow
  Ornstein-Uhlenbeck processes unrelated to behaviour) and a per-unit slow drift of the
  log-rate (Ornstein-Uhlenbeck, time constant minutes). ``b_i`` is the rest rate,
  log-uniform in ``baseline_rate_hz``; rates are capped at ``max_rate_hz``.
- **Spiking.** Poisson at ``sim_dt_s`` resolution (spike times uniform inside the step,
  so continuous float64, not on a grid), then an absolute refractory period imposed by
  deleting every spike within ``refractory_s`` of the previous kept spike. The input
  rate is raised by 1/(1 - λ·τ_ref) so the output rate stays ≈ λ.

**Regions** (``num_regions`` > 1, default 1): units are split into contiguous blocks, one
per brain area (``M1``, ``PMd``, ``S1``, ...). Every region shares the behaviour tuning and
nuisance latent 0; latent j >= 1 belongs to region (j - 1) mod R only, so a region's
private variability can be predicted from its own units but not from other regions (what
the intra- and inter-region masking schemes of MtM tell apart).

Every random draw comes from a stream seeded by ``(seed, session index, purpose)``, so a
seed gives byte-identical sessions, and e.g. changing the unit count leaves the hand
trajectory unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.ndimage import gaussian_filter1d
from scipy.signal import lfilter

from bci_decoder.data.nwb import write_nwb
from bci_decoder.data.session import Behavior, Session

Task = Literal["center_out", "random_target", "mixed"]

# Purposes of the random streams (part of the seed, so fixed forever).
_UNITS, _BEHAVIOUR, _LATENT, _DRIFT, _SPIKES = range(5)
_CHUNK_STEPS = 20_000  # simulation steps per spiking chunk (memory, not results)


class SimConfig(BaseModel):
    """Parameters of the simulated dataset; every field has a usable default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0)
    num_sessions: int = Field(3, ge=1)
    duration_s: float = Field(300.0, gt=1.0)
    num_units: int | tuple[int, int] = (80, 160)  # fixed, or an inclusive range per session
    task: Task = "mixed"
    start_time: float = 0.0  # absolute time of every session's start (s)
    behavior_rate_hz: float = Field(100.0, gt=0)
    sim_dt_s: float = Field(0.001, gt=0, le=0.001)  # spiking resolution

    # Units
    baseline_rate_hz: tuple[float, float] = (2.0, 60.0)  # rest rate, log-uniform
    max_rate_hz: float = Field(200.0, gt=0)
    refractory_s: float = Field(0.002, ge=0, lt=0.01)
    modulation_depth: tuple[float, float] = (0.1, 0.5)  # log-rate gain at reference speed
    speed_gain: tuple[float, float] = (-0.2, 0.6)  # log-rate gain of |v| at reference speed
    position_gain: float = Field(0.15, ge=0)  # max log-rate gain at reference distance
    reference_speed_cm_s: float = Field(30.0, gt=0)
    reference_distance_cm: float = Field(10.0, gt=0)
    neural_lead_s: float = Field(0.1, ge=0)  # neurons fire this long before the movement
    drift_strength: float = Field(0.15, ge=0)  # stationary s.d. of the log-rate drift
    drift_tau_s: float = Field(120.0, gt=0)
    num_latents: int = Field(3, ge=0)  # shared nuisance factors
    latent_strength: float = Field(0.5, ge=0)  # s.d. of each unit's latent log-rate term
    latent_tau_s: float = Field(0.3, gt=0)
    num_regions: int = Field(1, ge=1)  # brain areas (see "Regions"); 1: every unit in M1

    # Behaviour
    target_radius_cm: float = Field(10.0, gt=0)  # center-out target distance
    workspace_radius_cm: float = Field(10.0, gt=0)  # random-target disc
    reach_duration_s: tuple[float, float] = (0.45, 0.7)  # center-out reach (and return)
    hold_s: tuple[float, float] = (0.25, 0.6)
    reaction_s: tuple[float, float] = (0.15, 0.3)
    hand_noise_cm: float = Field(0.15, ge=0)  # s.d. of smooth motor noise on position
    hand_noise_tau_s: float = Field(0.08, gt=0)  # its smoothing (Gaussian s.d.)

    @model_validator(mode="after")
    def _ranges(self) -> SimConfig:
        pairs = {
            "baseline_rate_hz": self.baseline_rate_hz,
            "modulation_depth": self.modulation_depth,
            "speed_gain": self.speed_gain,
            "reach_duration_s": self.reach_duration_s,
            "hold_s": self.hold_s,
            "reaction_s": self.reaction_s,
        }
        if isinstance(self.num_units, tuple):
            pairs["num_units"] = self.num_units
            if self.num_units[0] < 1:
                raise ValueError("num_units must be at least 1")
        elif self.num_units < 1:
            raise ValueError("num_units must be at least 1")
        for name, (lo, hi) in pairs.items():
            if lo > hi:
                raise ValueError(f"{name}: low {lo} > high {hi}")
        if self.baseline_rate_hz[0] <= 0 or self.baseline_rate_hz[1] > self.max_rate_hz:
            raise ValueError("baseline_rate_hz must lie in (0, max_rate_hz]")
        if self.max_rate_hz * self.refractory_s >= 0.5:
            raise ValueError("max_rate_hz * refractory_s must be < 0.5")
        if min(self.reach_duration_s[0], self.hold_s[0], self.reaction_s[0]) <= 0:
            raise ValueError("reach, hold and reaction times must be positive")
        return self

    def session_task(self, index: int) -> Literal["center_out", "random_target"]:
        if self.task == "mixed":
            return "center_out" if index % 2 == 0 else "random_target"
        return self.task

    def session_id(self, index: int) -> str:
        return f"sim{self.seed}_s{index}"


@dataclass(frozen=True)
class SimUnits:
    """Ground-truth tuning of one session's units (what :func:`simulate_session` used)."""

    baseline_hz: np.ndarray  # (U,) rest rate
    preferred_direction: np.ndarray  # (U,) radians
    depth: np.ndarray  # (U,) log-rate gain of the velocity cosine term
    speed_gain: np.ndarray  # (U,)
    position_weight: np.ndarray  # (U, 2) log-rate per reference distance
    latent_loading: np.ndarray  # (U, num_latents)

    @property
    def num_units(self) -> int:
        return len(self.baseline_hz)


def _rng(cfg: SimConfig, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, index, purpose])


def sample_units(cfg: SimConfig, index: int) -> SimUnits:
    """The unit population of session ``index`` (deterministic in ``cfg.seed``)."""
    rng = _rng(cfg, index, _UNITS)
    if isinstance(cfg.num_units, tuple):
        n = int(rng.integers(cfg.num_units[0], cfg.num_units[1] + 1))
    else:
        n = int(cfg.num_units)
    lo, hi = np.log(cfg.baseline_rate_hz)
    baseline = np.exp(rng.uniform(lo, hi, n))
    pd = rng.uniform(-np.pi, np.pi, n)
    depth = rng.uniform(*cfg.modulation_depth, n)
    speed = rng.uniform(*cfg.speed_gain, n)
    pos_angle = rng.uniform(-np.pi, np.pi, n)
    pos_gain = rng.uniform(0.0, cfg.position_gain, n)
    pos_w = pos_gain[:, None] * np.stack([np.cos(pos_angle), np.sin(pos_angle)], 1)
    k = cfg.num_latents
    loading = rng.normal(0.0, cfg.latent_strength / np.sqrt(max(k, 1)), (n, k))
    if cfg.num_regions > 1:  # after every draw, so one region leaves the units unchanged
        region = unit_regions(n, cfg.num_regions)
        owner = (np.arange(k) - 1) % cfg.num_regions  # latent j >= 1 -> its region
        private = region[:, None] == owner[None, :]
        private[:, 0] = True  # latent 0 is shared
        loading = np.where(private, loading, 0.0)
    return SimUnits(baseline, pd, depth, speed, pos_w, loading)


_AREAS = ("M1", "PMd", "S1", "PPC", "SMA", "V1")


def unit_regions(num_units: int, num_regions: int) -> np.ndarray:
    """(U,) region of each unit: contiguous blocks of near-equal size."""
    return (np.arange(num_units) * num_regions) // num_units


def region_names(num_units: int, num_regions: int) -> list[str]:
    """Brain area of each unit (``M1`` for all with one region)."""
    names = [_AREAS[r] if r < len(_AREAS) else f"area{r}" for r in range(num_regions)]
    return [names[r] for r in unit_regions(num_units, num_regions)]


# ----------------------------------------------------------------------------- behaviour


@dataclass(frozen=True)
class _Path:
    """Piecewise minimum-jerk hand path: segment i goes p0[i] -> p1[i] over [t0, t0+dur)."""

    t0: np.ndarray
    dur: np.ndarray
    p0: np.ndarray
    p1: np.ndarray
    noise_t: np.ndarray  # grid of the smooth motor noise
    noise_pos: np.ndarray  # (N, 2) cm
    noise_vel: np.ndarray  # (N, 2) cm/s

    def __call__(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Position (cm) and velocity (cm/s) at session-relative times ``t``."""
        i = np.clip(np.searchsorted(self.t0, t, side="right") - 1, 0, len(self.t0) - 1)
        dur = self.dur[i]
        tau = np.clip((t - self.t0[i]) / dur, 0.0, 1.0)
        tau2 = tau * tau
        s = tau2 * tau * (10.0 - 15.0 * tau + 6.0 * tau2)
        ds = 30.0 * tau2 * (1.0 - 2.0 * tau + tau2) / dur
        delta = self.p1[i] - self.p0[i]
        pos = self.p0[i] + delta * s[:, None]
        vel = delta * ds[:, None]
        for d in range(2):
            pos[:, d] += np.interp(t, self.noise_t, self.noise_pos[:, d])
            vel[:, d] += np.interp(t, self.noise_t, self.noise_vel[:, d])
        return pos, vel


def _plan(cfg: SimConfig, index: int, horizon: float) -> tuple[_Path, dict[str, np.ndarray]]:
    """Reach schedule covering [0, horizon) and its trials (session-relative times)."""
    rng = _rng(cfg, index, _BEHAVIOUR)
    task = cfg.session_task(index)
    t0: list[float] = []
    dur: list[float] = []
    p0: list[np.ndarray] = []
    p1: list[np.ndarray] = []
    t = 0.0
    pos = np.zeros(2)

    def hold(seconds: float) -> None:
        nonlocal t
        t0.append(t)
        dur.append(seconds)
        p0.append(pos)
        p1.append(pos)
        t += seconds

    def reach(target: np.ndarray, seconds: float) -> None:
        nonlocal t, pos
        t0.append(t)
        dur.append(seconds)
        p0.append(pos)
        p1.append(target)
        t += seconds
        pos = target

    angles = 2 * np.pi * np.arange(8) / 8
    targets = cfg.target_radius_cm * np.stack([np.cos(angles), np.sin(angles)], 1)
    starts: list[float] = []
    stops: list[float] = []
    ids: list[int] = []
    block: list[int] = []
    while t < horizon:
        start = t
        if task == "center_out":
            if not block:
                block = list(rng.permutation(8))
            k = int(block.pop())
            hold(rng.uniform(*cfg.hold_s) + rng.uniform(*cfg.reaction_s))
            reach(targets[k], rng.uniform(*cfg.reach_duration_s))
            hold(rng.uniform(*cfg.hold_s) + rng.uniform(*cfg.reaction_s))
            reach(np.zeros(2), rng.uniform(*cfg.reach_duration_s))
        else:
            k = -1
            r = cfg.workspace_radius_cm * np.sqrt(rng.uniform())
            a = rng.uniform(-np.pi, np.pi)
            goal = np.array([r * np.cos(a), r * np.sin(a)])
            dist = float(np.hypot(*(goal - pos)))
            # longer reaches take longer (Fitts-like), so peak speed grows sub-linearly
            base = np.mean(cfg.reach_duration_s) / cfg.target_radius_cm
            seconds = (0.3 + 0.5 * base * dist) * rng.uniform(0.85, 1.15)
            hold(rng.uniform(*cfg.hold_s) + rng.uniform(*cfg.reaction_s))
            reach(goal, max(seconds, 0.2))
        starts.append(start)
        stops.append(t)
        ids.append(k)
    hold(10.0)  # rest after the last segment, so any t past the plan is defined

    # Smooth motor noise on a coarse grid; velocity is its exact derivative.
    step = 0.005
    n = int(np.ceil((horizon + 1.0) / step)) + 1
    grid = np.arange(n) * step - 0.5
    white = rng.standard_normal((n, 2))
    sigma = cfg.hand_noise_tau_s / step
    npos = gaussian_filter1d(white, sigma, axis=0, mode="wrap")
    nvel = gaussian_filter1d(white, sigma, axis=0, order=1, mode="wrap") / step
    scale = cfg.hand_noise_cm / max(float(npos.std()), 1e-12)
    path = _Path(
        np.asarray(t0),
        np.asarray(dur),
        np.asarray(p0),
        np.asarray(p1),
        grid,
        npos * scale,
        nvel * scale,
    )
    trials = {
        "start_time": np.asarray(starts, dtype=np.float64),
        "stop_time": np.asarray(stops, dtype=np.float64),
        "target_id": np.asarray(ids, dtype=np.int64),
    }
    return path, trials


def _ou(rng: np.random.Generator, n: int, dims: int, step: float, tau: float) -> np.ndarray:
    """Unit-variance Ornstein-Uhlenbeck samples (n, dims) at spacing ``step``, stationary."""
    a = np.exp(-step / tau)
    w = rng.standard_normal((n, dims)) * np.sqrt(1.0 - a * a)
    w[0] = rng.standard_normal(dims)
    return lfilter([1.0], [1.0, -a], w, axis=0)


# ----------------------------------------------------------------------------- spiking


def _refractory(times: np.ndarray, units: np.ndarray, dead: float) -> np.ndarray:
    """Keep-mask: drop every spike within ``dead`` of its unit's previous kept spike.

    Exact, vectorised: a spike whose predecessor (in the current list) is at least
    ``dead`` after *its* predecessor is surely kept, so a follower closer than ``dead``
    is surely dropped; repeat until no close pair is left. Inputs sorted by (unit, time).
    """
    keep = np.ones(times.size, dtype=bool)
    if dead <= 0 or times.size < 2:
        return keep
    idx = np.arange(times.size)
    while True:
        t, u = times[idx], units[idx]
        close = np.zeros(idx.size, dtype=bool)
        close[1:] = (u[1:] == u[:-1]) & (t[1:] - t[:-1] < dead)
        if not close.any():
            return keep
        drop = close.copy()
        drop[1:] &= ~close[:-1]
        keep[idx[drop]] = False
        idx = idx[~drop]


def _spikes(
    cfg: SimConfig, index: int, units: SimUnits, path: _Path
) -> tuple[np.ndarray, np.ndarray]:
    """Spike times (session-relative, float64) and unit indices, sorted by time."""
    dt = cfg.sim_dt_s
    steps = int(round(cfg.duration_s / dt))
    n_units = units.num_units
    k = cfg.num_latents

    # Shared nuisance latents (on a 10 ms grid) and per-unit drift (on a 1 s grid).
    lat_step = 0.01
    n_lat = int(np.ceil(cfg.duration_s / lat_step)) + 2
    latents = (
        _ou(_rng(cfg, index, _LATENT), n_lat, k, lat_step, cfg.latent_tau_s)
        if k
        else np.zeros((n_lat, 0))
    )
    n_drift = int(np.ceil(cfg.duration_s)) + 2
    drift = cfg.drift_strength * _ou(
        _rng(cfg, index, _DRIFT), n_drift, n_units, 1.0, cfg.drift_tau_s
    )

    # Features x (T, F) times weights (F, U) give the log-rate modulation.
    ang = units.preferred_direction
    vref, pref = cfg.reference_speed_cm_s, cfg.reference_distance_cm
    weights = np.concatenate(
        [
            (units.depth * np.cos(ang))[None] / vref,
            (units.depth * np.sin(ang))[None] / vref,
            units.speed_gain[None] / vref,
            units.position_weight.T / pref,
            units.latent_loading.T,
        ]
    ).astype(np.float32)
    log_base = np.log(units.baseline_hz).astype(np.float32)
    max_rate = cfg.max_rate_hz
    ref = cfg.refractory_s

    # The drift is slow: hold it constant over blocks of ~0.1 s (one broadcast add).
    block = max(1, int(round(0.1 / dt)))
    n_blocks = -(-steps // block)
    chunk = max(1, _CHUNK_STEPS // block) * block
    block_t = (np.arange(n_blocks) + 0.5) * block * dt
    drift_blocks = np.stack(
        [np.interp(block_t, np.arange(n_drift), drift[:, u]) for u in range(n_units)], 1
    ).astype(np.float32)

    rng = _rng(cfg, index, _SPIKES)
    all_t: list[np.ndarray] = []
    all_u: list[np.ndarray] = []
    for c0 in range(0, n_blocks * block, chunk):
        c1 = min(c0 + chunk, n_blocks * block)
        t = (np.arange(c0, c1) + 0.5) * dt  # step centres
        pos, vel = path(t + cfg.neural_lead_s)
        speed = np.hypot(vel[:, 0], vel[:, 1])
        feats = [vel, speed[:, None], pos]
        if k:
            li = np.minimum(t / lat_step, n_lat - 1.0)
            lo = np.minimum(li.astype(np.int64), n_lat - 2)
            fr = (li - lo)[:, None]
            feats.append(latents[lo] * (1 - fr) + latents[lo + 1] * fr)
        x = np.concatenate(feats, 1).astype(np.float32)
        rate = x @ weights  # log-rate modulation, then the rate, in place
        rate += log_base
        rate.reshape(-1, block, n_units)[...] += drift_blocks[c0 // block : c1 // block, None]
        np.exp(rate, out=rate)
        np.minimum(rate, np.float32(max_rate), out=rate)
        if ref > 0:  # compensate for the refractory loss: output rate ≈ rate
            denom = rate * np.float32(-ref)
            denom += np.float32(1.0)
            rate /= denom
        rate *= np.float32(-dt)
        np.expm1(rate, out=rate)  # = -P(spike in the step)
        rate += rng.random(rate.shape, dtype=np.float32)  # u - p < 0 <=> spike
        flat = np.flatnonzero(rate < 0)
        step_i, unit_i = np.divmod(flat, n_units)
        jitter = rng.random(flat.size)
        keep = c0 + step_i < steps
        all_t.append((c0 + step_i[keep] + jitter[keep]) * dt)
        all_u.append(unit_i[keep].astype(np.int32))
    times = np.concatenate(all_t) if all_t else np.zeros(0)
    spike_units = np.concatenate(all_u) if all_u else np.zeros(0, np.int32)
    order = np.lexsort((times, spike_units))
    times, spike_units = times[order], spike_units[order]
    keep = _refractory(times, spike_units, ref)
    times, spike_units = times[keep], spike_units[keep]
    order = np.lexsort((spike_units, times))
    return times[order], spike_units[order]


# ----------------------------------------------------------------------------- sessions


def simulate_session(cfg: SimConfig, index: int) -> Session:
    """Session ``index`` of the dataset ``cfg`` describes (deterministic in the seed)."""
    units = sample_units(cfg, index)
    path, trials = _plan(cfg, index, cfg.duration_s + cfg.neural_lead_s + 1.0)
    times, spike_units = _spikes(cfg, index, units, path)

    start = float(cfg.start_time)
    n_b = int(round(cfg.duration_s * cfg.behavior_rate_hz))
    t_rel = (np.arange(n_b) + 0.5) / cfg.behavior_rate_hz  # each sample owns its bin
    pos, vel = path(t_rel)
    stamps = start + t_rel
    keep = trials["stop_time"] <= cfg.duration_s
    trials = {
        "start_time": start + trials["start_time"][keep],
        "stop_time": start + trials["stop_time"][keep],
        "target_id": trials["target_id"][keep],
    }
    task = cfg.session_task(index)
    # num_regions only where used: single-region sessions keep their description
    skip = {"num_sessions"} | ({"num_regions"} if cfg.num_regions == 1 else set())
    params = cfg.model_dump(mode="json", exclude=skip)
    description = (
        f"Simulated M1 session (bci_decoder.data.simulate), not a recording: "
        f"index {index}, task {task}, {units.num_units} units, "
        f"cosine velocity tuning + speed + position, log-linear Poisson spiking with "
        f"refractoriness, OU drift. Parameters: {json.dumps(params, sort_keys=True)}"
    )
    return Session(
        session_id=cfg.session_id(index),
        subject=f"sim-monkey-{index % 2}",
        spike_times=start + times,
        spike_units=spike_units,
        unit_ids=[f"u{i:03d}" for i in range(units.num_units)],
        brain_areas=region_names(units.num_units, cfg.num_regions),
        behavior={
            "hand_vel": Behavior("hand_vel", stamps, vel, "cm/s"),
            "hand_pos": Behavior("hand_pos", stamps, pos, "cm"),
        },
        domain=(start, start + cfg.duration_s),
        trials=trials,
        description=description,
    )


def simulate_sessions(cfg: SimConfig) -> list[Session]:
    """All ``cfg.num_sessions`` sessions."""
    return [simulate_session(cfg, i) for i in range(cfg.num_sessions)]


def write_simulated(cfg: SimConfig, out_dir: str | Path) -> list[Path]:
    """Simulate every session and write each to ``{out_dir}/{session_id}.nwb``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(cfg.num_sessions):
        session = simulate_session(cfg, i)
        paths.append(write_nwb(session, out / f"{session.session_id}.nwb"))
    return paths
