"""Preallocated rings for the daemon: spikes (time, unit) and sampled behaviour.

One writer (an inlet thread) and any number of readers, each holding its own cursor: a
cursor is the total number of samples written before it, so a reader that fell more than
``capacity`` behind knows exactly how many it lost (counted, never silent). Writes go into
preallocated numpy arrays; reads copy out (the reader owns what it gets), so the writer
never waits for a reader.

The GIL makes the single ``written`` counter update atomic with respect to readers; the
arrays are filled before the counter moves, so a reader never sees a half-written sample.
"""

from __future__ import annotations

import threading

import numpy as np


class SampleRing:
    """Ring of (timestamp float64, row of ``channels`` values) samples."""

    def __init__(self, capacity: int, channels: int, dtype: np.dtype | type = np.float32) -> None:
        if capacity < 1:
            raise ValueError(f"ring capacity must be >= 1, got {capacity}")
        if channels < 1:
            raise ValueError(f"ring needs >= 1 channel, got {channels}")
        self.capacity = int(capacity)
        self.channels = int(channels)
        self.times = np.full(self.capacity, np.nan, np.float64)  # (C,)
        self.data = np.zeros((self.capacity, self.channels), dtype)  # (C, channels)
        self.written = 0  # samples written since creation (the write cursor)
        self.overwritten_unread = 0  # samples a reader lost because it fell behind
        self._lock = threading.Lock()  # writers only: readers never block the writer

    def __len__(self) -> int:
        return min(self.written, self.capacity)

    @property
    def fill(self) -> float:
        """Share of the ring holding samples (0..1)."""
        return len(self) / self.capacity

    def write(self, times: np.ndarray, data: np.ndarray) -> None:
        """Append samples: times (N,) float64, data (N, channels) or (N,) for one channel."""
        n = len(times)
        if n == 0:
            return
        data = np.asarray(data).reshape(n, self.channels)
        with self._lock:
            if n > self.capacity:  # keep the newest; the rest is lost to every reader
                times, data = times[-self.capacity :], data[-self.capacity :]
                self.written += n - self.capacity
                n = self.capacity
            start = self.written % self.capacity
            first = min(n, self.capacity - start)
            self.times[start : start + first] = times[:first]
            self.data[start : start + first] = data[:first]
            if first < n:
                self.times[: n - first] = times[first:]
                self.data[: n - first] = data[first:]
            self.written += n

    def write_one(self, t: float, row: np.ndarray) -> None:
        """Append one sample without allocating (the decode loop's recorder hand-off)."""
        with self._lock:
            i = self.written % self.capacity
            self.times[i] = t
            self.data[i] = row
            self.written += 1

    def read(self, cursor: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Samples written since ``cursor``: (times, data, new_cursor, lost).

        ``lost`` counts samples overwritten before this reader got them."""
        end = self.written
        lost = max(0, end - self.capacity - cursor)
        cursor += lost
        n = end - cursor
        if n <= 0:
            return self.times[:0].copy(), self.data[:0].copy(), end, lost
        idx = np.arange(cursor, end) % self.capacity  # (n,)
        times, data = self.times[idx], self.data[idx]
        # the writer may have wrapped over the oldest of these while we copied
        wrapped = max(0, self.written - self.capacity - cursor)
        if wrapped:
            times, data = times[wrapped:], data[wrapped:]
            lost += wrapped
        if lost:
            with self._lock:
                self.overwritten_unread += lost
        return times, data, end, lost

    def cursor_at(self, t: float) -> int:
        """The cursor of the first kept sample with time >= t (for 'the last N seconds')."""
        end = self.written
        begin = max(0, end - self.capacity)
        if end == begin:
            return end
        idx = np.arange(begin, end) % self.capacity
        pos = int(np.searchsorted(self.times[idx], t, side="left"))
        return begin + pos

    def last_seconds(self, seconds: float, now: float) -> tuple[np.ndarray, np.ndarray]:
        """Copy of the samples with now - seconds <= time <= now."""
        times, data, _, _ = self.read(self.cursor_at(now - seconds))
        keep = times <= now
        return times[keep], data[keep]

    @property
    def newest_time(self) -> float:
        if self.written == 0:
            return float("nan")
        return float(self.times[(self.written - 1) % self.capacity])


class SpikeRing(SampleRing):
    """Spike times (float64) and stream unit indices (int32), in arrival order."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, 1, np.int32)

    def read_spikes(self, cursor: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(times (N,), units (N,), new_cursor, lost) since ``cursor``."""
        times, data, cursor, lost = self.read(cursor)
        return times, data[:, 0], cursor, lost

    def last_spikes(self, seconds: float, now: float) -> tuple[np.ndarray, np.ndarray]:
        """(times (N,), units (N,)) of the spikes with now - seconds <= time <= now."""
        times, data = self.last_seconds(seconds, now)
        return times, data[:, 0]
