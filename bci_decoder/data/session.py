"""One recording session: spikes, units, behaviour, trials, and the time split.

Times are absolute float64 seconds throughout (see ARCHITECTURE "Time"): a session may
start at t = 36,000 s and nothing downstream may lose precision because of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Behavior:
    """A named, sampled behaviour series (e.g. ``hand_vel``), shape (T, D)."""

    name: str
    timestamps: np.ndarray  # (T,) float64 seconds
    data: np.ndarray  # (T, D) float32
    unit: str = ""

    def __post_init__(self) -> None:
        self.timestamps = np.asarray(self.timestamps, dtype=np.float64)
        data = np.asarray(self.data, dtype=np.float32)
        if data.ndim == 1:
            data = data[:, None]
        self.data = data
        if self.timestamps.ndim != 1 or len(self.timestamps) != len(self.data):
            raise ValueError(
                f"behaviour {self.name!r}: {len(self.timestamps)} timestamps for "
                f"{len(self.data)} samples"
            )

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    def between(self, start: float, stop: float) -> Behavior:
        """Samples with start <= t < stop."""
        keep = (self.timestamps >= start) & (self.timestamps < stop)
        return Behavior(self.name, self.timestamps[keep], self.data[keep], self.unit)


@dataclass
class Session:
    """Spikes of one recording as parallel arrays sorted by time.

    ``spike_units[i]`` indexes ``unit_ids``; unit ids are the recording's own names and are
    only meaningful inside this session (the model prefixes them with the session id).
    """

    session_id: str
    subject: str
    spike_times: np.ndarray  # (S,) float64 seconds, sorted
    spike_units: np.ndarray  # (S,) int32 index into unit_ids
    unit_ids: list[str]
    brain_areas: list[str]
    behavior: dict[str, Behavior]
    domain: tuple[float, float]  # valid time [start, stop)
    trials: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (N,) array
    description: str = ""
    # ISO 8601 start of the recording (NWB session_start_time); orders days of a subject
    recorded_at: str = ""

    def __post_init__(self) -> None:
        self.spike_times = np.asarray(self.spike_times, dtype=np.float64)
        self.spike_units = np.asarray(self.spike_units, dtype=np.int32)
        if self.spike_times.shape != self.spike_units.shape:
            raise ValueError("spike_times and spike_units must have the same length")
        if len(self.brain_areas) != len(self.unit_ids):
            raise ValueError("one brain area per unit is required")
        if not np.all(np.isfinite(self.spike_times)):
            raise ValueError(f"session {self.session_id}: non-finite spike times")
        if self.spike_units.size and (
            self.spike_units.min() < 0 or self.spike_units.max() >= len(self.unit_ids)
        ):
            raise ValueError(f"session {self.session_id}: spike unit index out of range")
        order = np.argsort(self.spike_times, kind="stable")
        if not np.all(order == np.arange(order.size)):
            self.spike_times = self.spike_times[order]
            self.spike_units = self.spike_units[order]
        self.domain = (float(self.domain[0]), float(self.domain[1]))

    @property
    def num_units(self) -> int:
        return len(self.unit_ids)

    @property
    def duration(self) -> float:
        return self.domain[1] - self.domain[0]

    def default_output(self) -> str:
        """The behaviour decoded by default: hand velocity when recorded, else the cursor's
        position (wrist tasks: the cursor follows wrist force, and every Spike day has it,
        where force starts on 2012-08-17 and has flat channels on some days), else force."""
        for name in ("hand_vel", "cursor_pos", "force", "cursor_vel"):
            if name in self.behavior:
                return name
        return next(iter(self.behavior))

    def spikes_between(self, start: float, stop: float) -> tuple[np.ndarray, np.ndarray]:
        """Spikes with start < t <= stop (the half-open convention of the causal grid)."""
        lo = np.searchsorted(self.spike_times, start, side="right")
        hi = np.searchsorted(self.spike_times, stop, side="right")
        return self.spike_times[lo:hi], self.spike_units[lo:hi]

    def slice(self, start: float, stop: float) -> Session:
        """A copy restricted to [start, stop) (spikes and behaviour)."""
        lo = np.searchsorted(self.spike_times, start, side="left")
        hi = np.searchsorted(self.spike_times, stop, side="left")
        return Session(
            session_id=self.session_id,
            subject=self.subject,
            spike_times=self.spike_times[lo:hi],
            spike_units=self.spike_units[lo:hi],
            unit_ids=list(self.unit_ids),
            brain_areas=list(self.brain_areas),
            behavior={k: b.between(start, stop) for k, b in self.behavior.items()},
            domain=(start, stop),
            trials=dict(self.trials),
            description=self.description,
            recorded_at=self.recorded_at,
        )

    def shifted(self, offset: float) -> Session:
        """The same session with every time moved by ``offset`` seconds."""
        return Session(
            session_id=self.session_id,
            subject=self.subject,
            spike_times=self.spike_times + offset,
            spike_units=self.spike_units.copy(),
            unit_ids=list(self.unit_ids),
            brain_areas=list(self.brain_areas),
            behavior={
                k: Behavior(b.name, b.timestamps + offset, b.data, b.unit)
                for k, b in self.behavior.items()
            },
            domain=(self.domain[0] + offset, self.domain[1] + offset),
            trials={
                k: (v + offset if k in ("start_time", "stop_time") else v)
                for k, v in self.trials.items()
            },
            description=self.description,
            recorded_at=self.recorded_at,
        )


@dataclass(frozen=True)
class TimeSplit:
    """First 70% of the domain trains (its last part validates), the last 30% tests."""

    train: tuple[float, float]
    valid: tuple[float, float]
    test: tuple[float, float]

    @property
    def fit(self) -> tuple[float, float]:
        """Train and validation together: the whole first 70%."""
        return (self.train[0], self.valid[1])


def time_split(
    session: Session, train_fraction: float = 0.7, valid_fraction: float = 0.1
) -> TimeSplit:
    """Split a session's domain in time; ``valid_fraction`` is of the training part."""
    start, stop = session.domain
    cut = start + train_fraction * (stop - start)
    vcut = cut - valid_fraction * (cut - start)
    return TimeSplit(train=(start, vcut), valid=(vcut, cut), test=(cut, stop))
