"""Replay a recording into LSL as a rig would stream it: the stand-in for tests, demos
and benchmarks.

Spikes go out on a ``Spikes`` stream (channels ``unit`` and ``seq``; unit labels and the
session id in the description), behaviour on a ``Behavior`` stream, both paced in 1 ms
chunks on absolute deadlines. Session time s maps to LSL time ``base + (s - start) /
speed``: every sample carries its own timestamp, so a receiver sees the recording's
timing (compressed at ``speed`` > 1), not the chunking.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pylsl

from bci_decoder.data.session import Session
from bci_decoder.runtime.decode_loop import lsl_clock
from bci_decoder.runtime.lsl_io import (
    behavior_stream_info,
    describe_recording,
    spike_stream_info,
)


@dataclass
class ReplayLog:
    """What was sent: for each spike its LSL timestamp and the clock when it was pushed."""

    spike_time: np.ndarray  # (S,) float64 LSL timestamps
    spike_unit: np.ndarray  # (S,) int32
    push_clock: np.ndarray  # (S,) float64 local_clock() at push
    behavior_time: np.ndarray  # (T,) float64 LSL timestamps
    behavior: np.ndarray  # (T, D) float32
    base: float  # LSL time of the replayed span's start
    start: float  # session time of the span's start
    speed: float

    def to_session_time(self, t: np.ndarray) -> np.ndarray:
        return (np.asarray(t) - self.base) * self.speed + self.start

    def save(self, path: str) -> None:
        np.savez(path, **{k: np.asarray(v) for k, v in self.__dict__.items()})


class Replayer(threading.Thread):
    """Streams ``session`` over [start, stop) into LSL; ``run()`` returns when done."""

    def __init__(
        self,
        session: Session,
        *,
        start: float | None = None,
        stop: float | None = None,
        speed: float = 1.0,
        name: str = "bci_replay",
        source_id: str | None = None,
        output: str | None = None,
        behavior: bool = True,
        chunk_s: float = 0.001,
        lead_s: float = 0.0,
        counts_bin_s: float | None = None,
        wait_for_consumer_s: float = 0.0,
    ) -> None:
        super().__init__(name="replay", daemon=True)
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        lo, hi = session.domain
        self.start_t = lo if start is None else max(lo, start)
        self.stop_t = hi if stop is None else min(hi, stop)
        if self.stop_t <= self.start_t:
            raise ValueError(f"nothing to replay in [{self.start_t}, {self.stop_t})")
        self.session, self.speed, self.chunk_s, self.lead_s = session, speed, chunk_s, lead_s
        self.counts_bin_s = counts_bin_s
        self.wait_for_consumer_s = wait_for_consumer_s  # hold the first spike until a
        # receiver is connected (LSL keeps nothing for inlets that connect later)
        sid = source_id or f"bci-replay-{uuid.uuid4().hex[:8]}"
        self.source_id = sid
        if counts_bin_s:
            info = pylsl.StreamInfo(
                name, "SpikeCounts", session.num_units, 1.0 / counts_bin_s * speed,
                pylsl.cf_int32, sid,
            )  # fmt: skip
            chans = info.desc().append_child("channels")
            for u in session.unit_ids:
                chans.append_child("channel").append_child_value("label", u)
            describe_recording(info, session.session_id, session.subject, session.recorded_at)
        else:
            info = spike_stream_info(
                name,
                sid,
                list(session.unit_ids),
                session.session_id,
                session.subject,
                session.recorded_at,
            )
        # max_buffered counts hundreds of samples for an irregular stream: 1,000 holds
        # 100,000 spikes (25 s of 200 units at 20 Hz) for a receiver that falls behind
        self.spike_outlet = pylsl.StreamOutlet(
            info, chunk_size=1, max_buffered=60 if counts_bin_s else 1000
        )
        self.output = output or session.default_output()
        self.behavior_outlet = None
        if behavior and self.output in session.behavior:
            beh = session.behavior[self.output]
            rate = 1.0 / float(np.median(np.diff(beh.timestamps))) * speed
            labels = [f"{self.output}{i}" for i in range(beh.dim)]
            binfo = behavior_stream_info(
                name + "_behavior", sid + "-behavior", self.output, labels, rate,
                session.session_id,
            )  # fmt: skip
            self.behavior_outlet = pylsl.StreamOutlet(binfo, chunk_size=1, max_buffered=60)
        self.done = threading.Event()
        self._stop_event = threading.Event()
        self.log: ReplayLog | None = None
        self.progress = 0.0

    def stop(self, wait_s: float = 5.0) -> None:
        """Stop sending; wait up to ``wait_s`` for the thread to end, so ``log`` (what was
        sent) is there when this returns."""
        self._stop_event.set()
        if wait_s > 0 and self.is_alive() and threading.current_thread() is not self:
            self.join(wait_s)

    def wait_for_consumers(self, timeout: float) -> bool:
        return self.spike_outlet.wait_for_consumers(timeout)

    def run(self) -> None:
        s = self.session
        times, units = s.spikes_between(self.start_t, self.stop_t)
        if self.counts_bin_s:
            times, units = self._binned(times, units)
        beh = s.behavior.get(self.output)
        if beh is not None and self.behavior_outlet is not None:
            beh = beh.between(self.start_t, self.stop_t)
            b_t, b_x = beh.timestamps, beh.data
        else:
            b_t, b_x = np.zeros(0), np.zeros((0, 1), np.float32)
        if self.wait_for_consumer_s > 0:
            self.spike_outlet.wait_for_consumers(self.wait_for_consumer_s)
            if self.behavior_outlet is not None:
                self.behavior_outlet.wait_for_consumers(self.wait_for_consumer_s)
        base = lsl_clock() + self.lead_s
        to_lsl = lambda st: base + (st - self.start_t) / self.speed  # noqa: E731
        lsl_t = to_lsl(times)  # (S,)
        lsl_b = to_lsl(b_t)  # (T,)
        push_clock = np.full(len(times), np.nan)
        data = np.zeros((len(times), 2), np.int32)
        data[:, 0] = units
        data[:, 1] = np.arange(len(times), dtype=np.int64) % (2**31)
        i = j = 0
        k = 0
        end = to_lsl(self.stop_t)
        while not self._stop_event.is_set():
            deadline = base + k * self.chunk_s
            rest = deadline - lsl_clock()
            if rest > 0:
                time.sleep(rest)
            now = lsl_clock()
            i2 = int(np.searchsorted(lsl_t, now, side="right"))
            if i2 > i:
                self._push_spikes(data[i:i2], lsl_t[i:i2])
                push_clock[i:i2] = lsl_clock()
                i = i2
            j2 = int(np.searchsorted(lsl_b, now, side="right"))
            if j2 > j:
                self.behavior_outlet.push_chunk(
                    np.ascontiguousarray(b_x[j:j2], np.float32), lsl_b[j:j2].tolist()
                )
                j = j2
            self.progress = (now - base) / max(end - base, 1e-9)
            if now >= end:
                break
            k = max(k + 1, int((now - base) / self.chunk_s))  # never fall behind in a burst
        self.log = ReplayLog(
            lsl_t[:i], units[:i].astype(np.int32), push_clock[:i], lsl_b[:j],
            b_x[:j].astype(np.float32), base, self.start_t, self.speed,
        )  # fmt: skip
        self.done.set()

    def _push_spikes(self, rows: np.ndarray, stamps: np.ndarray) -> None:
        if self.counts_bin_s:
            self._push_counts(rows, stamps)
        else:
            self.spike_outlet.push_chunk(rows, stamps.tolist())

    # ------------------------------------------------------------- binned-count streams
    def _binned(self, times: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts per bin as pseudo-spikes at the bin's end (one row per non-empty bin)."""
        b = self.counts_bin_s
        edges = np.floor((times - self.start_t) / b).astype(np.int64)
        return self.start_t + (edges + 1) * b, units

    def _push_counts(self, rows: np.ndarray, stamps: np.ndarray) -> None:
        # rows' spikes share bin-end stamps: one count vector per distinct stamp
        u_stamps, inverse = np.unique(stamps, return_inverse=True)
        counts = np.zeros((len(u_stamps), self.session.num_units), np.int32)
        np.add.at(counts, (inverse, rows[:, 0]), 1)
        self.spike_outlet.push_chunk(counts, u_stamps.tolist())
