"""Lab Streaming Layer in and out: stream descriptions, resolution, inlet threads, outlet.

Conventions (ARCHITECTURE "LSL conventions"):
- Spikes in: type ``Spikes``, irregular rate, int32. Channel 0 is the unit index; an
  optional channel labelled ``seq`` carries a per-sample sequence number, so a gap (LSL
  drops silently when its buffers overflow) is counted. Unit labels are listed in
  ``desc/units/unit/label`` (or, for a one-channel stream, may be absent: index = unit).
  The LSL timestamp of a sample is the spike time.
- Binned counts in: type ``SpikeCounts``, regular rate, N channels labelled with the units;
  a count c at timestamp t becomes c spikes at t.
- Behaviour in: type ``Behavior``, regular rate, float32, labelled channels.
- Decoded out: type ``Control``, regular rate = cadence, float32, channel labels = outputs;
  the timestamp is the decode time t, so a receiver's latency is ``local_clock() - t``.

Guards: a spike stamped more than ``max_future_s`` ahead of the LSL clock is rejected
(counted as ``future``) before it can become the stream's newest time, so one bad
timestamp cannot make every later spike look out of order; when most of a second's
spikes are rejected the stream counts as stalled. A regular stream that declares an
absurd rate gets buffers capped in bytes (or is refused, and says so), never a 1 GB
allocation; nothing a stream sends ends an inlet thread (errors are counted and the
last ones kept for /status).

The inlets pull with ``pull_chunk(dest_obj=..., min_samples=1)`` into a preallocated
buffer: it returns as soon as one sample is there (without ``min_samples`` it waits for a
full chunk, adding tens of ms; without ``dest_obj`` pylsl builds Python lists).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pylsl
from pylsl.util import LostError

from bci_decoder.runtime.priority import realtime
from bci_decoder.runtime.ring import SampleRing, SpikeRing
from bci_decoder.serve_config import StreamSettings

log = logging.getLogger(__name__)

SEQ_LABEL = "seq"
# why a spike was rejected at the inlet, as /status.dropped names it; the recorder stores
# code i + 1 for REJECTION_REASONS[i] (0 is never written: it would mean "kept")
REJECTION_REASONS = ("nan_time", "future_time", "bad_unit", "out_of_order")
NAN_TIME, FUTURE_TIME, BAD_UNIT, OUT_OF_ORDER = 1, 2, 3, 4


def predicate(query: StreamSettings) -> str:
    """The XPath predicate liblsl resolves: every field given must match."""

    def q(v: str) -> str:
        return v.replace("'", "")

    parts = [f"type='{q(query.type)}'"]
    if query.name:
        parts.append(f"name='{q(query.name)}'")
    if query.source_id:
        parts.append(f"source_id='{q(query.source_id)}'")
    return " and ".join(parts)


def resolve(query: StreamSettings, timeout: float) -> pylsl.StreamInfo | None:
    """The first stream matching ``query`` within ``timeout`` seconds, or None."""
    found = pylsl.resolve_bypred(predicate(query), 1, timeout)
    return found[0] if found else None


# ---------------------------------------------------------------- stream descriptions
def _append_channels(info: pylsl.StreamInfo, labels: list[str], unit: str = "") -> None:
    chans = info.desc().append_child("channels")
    for label in labels:
        ch = chans.append_child("channel")
        ch.append_child_value("label", label)
        if unit:
            ch.append_child_value("unit", unit)


def spike_stream_info(
    name: str,
    source_id: str,
    unit_labels: list[str],
    session_id: str = "",
    subject: str = "",
    recorded_at: str = "",
) -> pylsl.StreamInfo:
    """An irregular-rate int32 spike-event stream with (unit, seq) channels.

    ``desc/session`` names the recording; ``desc/subject`` (and ``desc/recorded_at``)
    let the daemon start a new day of a known subject from its earlier days' tables."""
    info = pylsl.StreamInfo(name, "Spikes", 2, pylsl.IRREGULAR_RATE, pylsl.cf_int32, source_id)
    _append_channels(info, ["unit", SEQ_LABEL])
    units = info.desc().append_child("units")
    for label in unit_labels:
        units.append_child("unit").append_child_value("label", label)
    describe_recording(info, session_id, subject, recorded_at)
    return info


def describe_recording(
    info: pylsl.StreamInfo, session_id: str, subject: str = "", recorded_at: str = ""
) -> None:
    """``desc/session``, ``desc/subject`` and ``desc/recorded_at``, where known."""
    for key, value in (("session", session_id), ("subject", subject), ("recorded_at", recorded_at)):
        if value:
            info.desc().append_child_value(key, value)


def behavior_stream_info(
    name: str, source_id: str, output: str, labels: list[str], rate: float, session_id: str = ""
) -> pylsl.StreamInfo:
    info = pylsl.StreamInfo(
        name, "Behavior", len(labels), rate, pylsl.cf_float32, source_id
    )  # fmt: skip
    _append_channels(info, labels)
    info.desc().append_child_value("output", output)
    if session_id:
        info.desc().append_child_value("session", session_id)
    return info


def control_stream_info(
    name: str, source_id: str, output: str, labels: list[str], rate: float
) -> pylsl.StreamInfo:
    info = pylsl.StreamInfo(name, "Control", len(labels), rate, pylsl.cf_float32, source_id)
    _append_channels(info, labels)
    info.desc().append_child_value("output", output)
    return info


def channel_labels(info: pylsl.StreamInfo) -> list[str]:
    out = []
    ch = info.desc().child("channels").child("channel")
    while not ch.empty():
        out.append(ch.child_value("label"))
        ch = ch.next_sibling("channel")
    return out


def unit_labels(info: pylsl.StreamInfo) -> list[str]:
    """Unit labels of a spike stream, in unit-index order ([] if the stream lists none)."""
    if info.type() == "SpikeCounts":
        return channel_labels(info)
    out = []
    u = info.desc().child("units").child("unit")
    while not u.empty():
        out.append(u.child_value("label"))
        u = u.next_sibling("unit")
    return out


def desc_value(info: pylsl.StreamInfo, key: str) -> str:
    return info.desc().child_value(key)


# ---------------------------------------------------------------- inlets
@dataclass
class InletStats:
    """Counters of one inlet; every sample that is not kept is counted under one reason."""

    received: int = 0
    kept: int = 0
    nan_time: int = 0
    out_of_order: int = 0
    bad_unit: int = 0  # unit index outside the stream's declared units (or < 0)
    future: int = 0  # stamped more than max_future_s ahead of our clock
    seq_gaps: int = 0  # samples LSL lost between sender and us (sequence numbers)
    connects: int = 0
    losses: int = 0  # times the stream vanished
    last_sample_clock: float = float("nan")  # local_clock() when a sample last arrived
    errors: list[str] = field(default_factory=list)  # the last 20
    error_count: int = 0

    def dropped(self) -> int:
        return self.nan_time + self.out_of_order + self.bad_unit + self.seq_gaps + self.future

    def error(self, message: str) -> None:
        self.error_count += 1
        self.errors.append(message[:300])
        del self.errors[:-20]


class RejectionWindow:
    """Share of the samples rejected over the last full second (one writer thread)."""

    def __init__(self, span_s: float = 1.0) -> None:
        self.span = span_s
        self.start = float("-inf")
        self.received = self.rejected = 0
        self.last_share = 0.0  # share in the last full window
        self.last_end = float("-inf")

    def add(self, now: float, received: int, rejected: int) -> None:
        if now - self.start >= self.span:
            if self.received:
                self.last_share = self.rejected / self.received
                self.last_end = now
            self.start, self.received, self.rejected = now, 0, 0
        self.received += received
        self.rejected += rejected

    def share(self, now: float) -> float:
        """The last full window's share (0 once it is older than two windows)."""
        if now - self.last_end > 2 * self.span:
            return 0.0
        return self.last_share


class InletThread(threading.Thread):
    """Resolve a stream (retrying until stopped), pull chunks, hand them to ``_handle``.

    States: ``waiting`` (no such stream yet), ``connected``, ``lost`` (it vanished; we
    resolve it again). A vanished stream never ends the thread; only ``stop()`` does.
    """

    def __init__(
        self,
        query: StreamSettings,
        *,
        chunk: int = 4096,
        resolve_timeout: float = 1.0,
        pull_timeout: float = 0.05,
        max_buffer_s: int = 10,
        max_buffer_spikes: int = 2_000_000,
        max_buffer_samples: int = 2_000_000,
        name: str = "inlet",
        rt_priority: int | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.rt_priority = rt_priority  # SCHED_FIFO priority of this thread (priority.py)
        self.rt_error: str | None = None
        self.query = query
        self.chunk = chunk
        self.resolve_timeout = resolve_timeout
        self.pull_timeout = pull_timeout
        self.max_buffer_s = max_buffer_s  # regular-rate streams: seconds LSL may hold
        self.max_buffer_spikes = max_buffer_spikes  # irregular (spike) streams: samples
        self.max_buffer_samples = max_buffer_samples  # regular streams: samples, any rate
        self.stats = InletStats()
        self.state = "waiting"
        self.info: pylsl.StreamInfo | None = None
        self._stop_event = threading.Event()
        self.connected = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def _setup(self, info: pylsl.StreamInfo) -> None:  # per (re)connection
        raise NotImplementedError

    def _handle(self, data: np.ndarray, times: np.ndarray) -> None:
        raise NotImplementedError

    def _dtype(self) -> type:
        raise NotImplementedError

    def run(self) -> None:
        if self.rt_priority:
            self.rt_error = realtime(self.rt_priority)
        while not self._stop_event.is_set():
            try:
                self._connect_and_read()
            except Exception as e:  # noqa: BLE001 - the thread must outlive any stream
                self.stats.error(f"{type(e).__name__}: {e}")
                self.state = "error"
                self.connected.clear()
                log.exception("%s: unexpected error; resolving the stream again", self.name)
                self._stop_event.wait(1.0)
        self.state = "stopped"

    def _connect_and_read(self) -> None:
        """One resolve, connection and read, until the stream is lost or we stop."""
        info = resolve(self.query, self.resolve_timeout)
        if info is None:
            return
        rate = info.nominal_srate()
        if rate > 0 and self.max_buffer_samples / rate < 1.0:
            # liblsl sizes a regular stream's buffer in whole seconds of samples: a
            # stream this fast cannot be buffered within the cap; refuse it, visibly
            self.state = "refused"
            self.stats.error(
                f"stream {info.name()!r} declares {rate:g} Hz; at most "
                f"{self.max_buffer_samples:g} Hz can be buffered: fix the sender's rate"
            )
            self._stop_event.wait(5.0)
            return
        # Same host: the sender's timestamps are already in our clock; liblsl's clock
        # sync would add a noisy estimate of zero (tens of us, changing over time),
        # shifting spikes and even reordering them. Another host: correct them.
        same_host = info.hostname() == socket.gethostname()
        try:
            # liblsl counts max_buflen in seconds for regular streams but in hundreds
            # of samples for irregular ones: 10 would hold only 1,000 spikes (0.25 s
            # of 200 units at 20 Hz), and a burst past that is lost
            regular = rate > 0
            # regular: seconds, capped so that seconds x rate <= max_buffer_samples
            seconds = max(1, min(self.max_buffer_s, int(self.max_buffer_samples / max(rate, 1))))
            inlet = pylsl.StreamInlet(
                info,
                max_buflen=seconds if regular else self.max_buffer_spikes // 100,
                recover=False,  # a vanished stream is re-resolved here, visibly
                processing_flags=0 if same_host else pylsl.proc_clocksync,
            )
            inlet.open_stream(timeout=5.0)
            full = inlet.info(timeout=5.0)
        except Exception as e:  # noqa: BLE001 - liblsl raises several types
            self.stats.error(f"open: {e}")
            time.sleep(0.2)
            return
        self.info = full
        try:
            self._setup(full)
        except Exception:
            inlet.close_stream()
            raise
        buf = np.zeros((self.chunk, full.channel_count()), self._dtype())
        self.stats.connects += 1
        self.state = "connected"
        self.connected.set()
        log.info("%s: connected to %s", self.name, full.name())
        try:
            while not self._stop_event.is_set():
                data, ts = inlet.pull_chunk(
                    timeout=self.pull_timeout,
                    max_samples=self.chunk,
                    dest_obj=buf,
                    min_samples=1,
                    as_numpy=True,
                )
                if len(ts):
                    self.stats.received += len(ts)
                    self.stats.last_sample_clock = pylsl.local_clock()
                    self._handle(data, np.asarray(ts, np.float64))
        except LostError:
            self.stats.losses += 1
            self.state = "lost"
            self.connected.clear()
            log.warning("%s: stream lost; resolving it again", self.name)
        except Exception as e:  # noqa: BLE001 - a bad chunk must not end the inlet
            self.stats.error(f"{type(e).__name__}: {e}")
            self.state = "lost"
            self.connected.clear()
            log.exception("%s: reading the stream failed; resolving it again", self.name)
            time.sleep(0.2)
        finally:
            try:
                inlet.close_stream()
            except Exception:  # noqa: BLE001
                pass


class SpikeInletThread(InletThread):
    """Spike events (or binned counts) into a ``SpikeRing`` of (time, stream unit index)."""

    def __init__(
        self, query: StreamSettings, ring: SpikeRing, max_future_s: float = 1.0, **kw
    ) -> None:
        super().__init__(query, name=kw.pop("name", "spike-inlet"), **kw)
        self.ring = ring
        self.max_future_s = max_future_s
        self.window = RejectionWindow()
        self.on_spikes = None  # optional callable(times, units): the recorder
        # optional callable(times, units, reasons): the spikes rejected here, as received
        # (raw timestamp and unit) with their reason code (REJECTION_REASONS): the recorder
        self.on_rejected = None
        self.labels: list[str] = []
        self.session_hint = ""
        self.subject_hint = ""  # desc/subject: a new day of a known subject
        self.recorded_hint = ""  # desc/recorded_at
        self.counts = False
        self._seq_col: int | None = None
        self._last_seq: int | None = None
        self._last_time = -np.inf

    def _dtype(self) -> type:
        return np.int32

    def _setup(self, info: pylsl.StreamInfo) -> None:
        self.counts = info.type() == "SpikeCounts" or info.nominal_srate() > 0
        self.labels = unit_labels(info)
        self.session_hint = desc_value(info, "session")
        self.subject_hint = desc_value(info, "subject")
        self.recorded_hint = desc_value(info, "recorded_at")
        chans = channel_labels(info)
        self._seq_col = chans.index(SEQ_LABEL) if (not self.counts and SEQ_LABEL in chans) else None
        self._last_seq = None
        self._last_time = -np.inf

    def mostly_rejected(self, now: float) -> bool:
        """Over half of the last full second's samples were rejected."""
        return self.window.share(now) > 0.5

    def rejected_share(self) -> float:
        return round(self.window.share(pylsl.local_clock()), 4)

    def _handle(self, data: np.ndarray, times: np.ndarray) -> None:
        st = self.stats
        kept_before, received = st.kept, len(times)
        now = pylsl.local_clock()
        horizon = now + self.max_future_s
        # +inf is not finite, counted as nan_time below (NaN compares False already): a
        # spike is dropped for one reason only, so the counts add up to what was received
        future = (times > horizon) & np.isfinite(times)
        st.future += int(future.sum())
        if self.counts:  # (N, U) counts at each sample time -> spikes
            ok = np.isfinite(times) & ~future
            st.nan_time += int((~np.isfinite(times)).sum())
            if self.on_rejected is not None and not ok.all():
                self._reject_counts(data, times, ok, future)
            data, times = data[ok], times[ok]
            counts = np.clip(data, 0, None)  # negative counts are not spikes
            st.bad_unit += int((data < 0).sum())
            if self.on_rejected is not None and (data < 0).any():  # one row per count
                rows, chans = np.nonzero(data < 0)
                self.on_rejected(times[rows], chans.astype(np.int32),
                                 np.full(len(rows), BAD_UNIT, np.int32))  # fmt: skip
            n_per_sample = counts.sum(1)
            units = np.nonzero(counts)[1]
            reps = counts[counts > 0]
            spike_units = np.repeat(units, reps).astype(np.int32)
            spike_times = np.repeat(times, n_per_sample)
            st.kept += len(spike_times)
            self.ring.write(spike_times, spike_units)
            self.window.add(now, received, received - int(ok.sum()))
            if self.on_spikes is not None and len(spike_times):
                self.on_spikes(spike_times, spike_units)
            return
        units = data[:, 0]
        if self._seq_col is not None:
            seq = data[:, self._seq_col].astype(np.int64)
            prev = self._last_seq
            chain = seq if prev is None else np.concatenate([[prev], seq])
            steps = np.diff(chain) & 0xFFFFFFFF  # int32 wrap
            st.seq_gaps += int(np.clip(steps - 1, 0, None).sum())
            self._last_seq = int(seq[-1])
        ok = np.isfinite(times)
        st.nan_time += int((~ok).sum())
        ok &= ~future  # never becomes the newest time, so later spikes stay in order
        nunits = len(self.labels)
        good_unit = (units >= 0) & ((units < nunits) if nunits else True)
        st.bad_unit += int((ok & ~good_unit).sum())
        ok &= good_unit
        # out of order: older than the newest spike already kept (the engine is causal)
        run_max = np.maximum.accumulate(np.where(ok, times, -np.inf))
        prev_max = np.concatenate([[self._last_time], run_max[:-1]])
        in_order = times >= np.maximum(prev_max, self._last_time)
        st.out_of_order += int((ok & ~in_order).sum())
        ok &= in_order
        if ok.any():
            self._last_time = float(times[ok][-1])
            st.kept += int(ok.sum())
            self.ring.write(times[ok], units[ok])
            if self.on_spikes is not None:
                self.on_spikes(times[ok], units[ok])
        if self.on_rejected is not None and not ok.all():
            # one reason per spike, in the order the counters above are taken
            reason = np.full(received, OUT_OF_ORDER, np.int32)
            reason[~good_unit] = BAD_UNIT
            reason[future] = FUTURE_TIME
            reason[~np.isfinite(times)] = NAN_TIME
            self.on_rejected(times[~ok], units[~ok], reason[~ok])
        self.window.add(now, received, received - (st.kept - kept_before))

    def _reject_counts(
        self, data: np.ndarray, times: np.ndarray, ok: np.ndarray, future: np.ndarray
    ) -> None:
        """Binned samples rejected for their time: the spikes each carried (its positive
        counts), at the raw timestamp, with the sample's reason. (The counters count
        samples here; a sample of all zeros carried no spike and leaves no row.)"""
        bad = np.nonzero(~ok)[0]
        counts = np.clip(data[bad], 0, None)  # (B, U)
        rows, units = np.nonzero(counts)
        reps = counts[rows, units]
        reason = np.where(future[bad], FUTURE_TIME, NAN_TIME)[rows]
        self.on_rejected(
            np.repeat(times[bad][rows], reps),
            np.repeat(units, reps).astype(np.int32),
            np.repeat(reason, reps).astype(np.int32),
        )


class BehaviorInletThread(InletThread):
    """A regular-rate behaviour stream into a ``SampleRing`` (recorded for calibration)."""

    def __init__(
        self, query: StreamSettings, capacity_s: float = 600.0, max_mb: float = 64.0, **kw
    ) -> None:
        # liblsl preallocates its buffer's samples (~60 B each): 10 s at 2e5 Hz would be
        # 120 MB; 250k samples hold 10 s up to 25 kHz, 1 s up to 250 kHz; above: refused
        kw.setdefault("max_buffer_samples", 250_000)
        super().__init__(query, name=kw.pop("name", "behavior-inlet"), **kw)
        self.capacity_s = capacity_s
        self.max_bytes = int(max_mb * 2**20)  # the ring's cap, whatever rate is declared
        self.on_samples = None  # optional callable(times, data): the recorder
        self.ring: SampleRing | None = None
        self.labels: list[str] = []
        self.output = ""
        self.rate = 0.0

    def _dtype(self) -> type:
        return np.float32

    def _setup(self, info: pylsl.StreamInfo) -> None:
        labels = channel_labels(info) or [f"ch{i}" for i in range(info.channel_count())]
        rate = info.nominal_srate() or 100.0
        channels = max(1, info.channel_count())
        # capacity_s of samples, but never more than max_bytes (times float64 + float32s)
        capacity = int(min(self.capacity_s * rate + 1, self.max_bytes // (8 + 4 * channels)))
        if capacity < 20:
            raise ValueError(
                f"behaviour stream {info.name()!r} has {channels} channels: too many to "
                f"buffer in {self.max_bytes / 2**20:g} MB"
            )
        if self.ring is None or (self.ring.channels, self.ring.capacity) != (channels, capacity):
            self.ring = SampleRing(capacity, channels)
        self.labels, self.rate = labels, rate
        self.output = desc_value(info, "output") or "hand_vel"

    def _handle(self, data: np.ndarray, times: np.ndarray) -> None:
        ok = np.isfinite(times) & np.isfinite(data).all(1)
        self.stats.nan_time += int((~ok).sum())
        self.stats.kept += int(ok.sum())
        if ok.any():
            self.ring.write(times[ok], data[ok])
            if self.on_samples is not None:
                self.on_samples(times[ok], data[ok])


class ControlOutlet:
    """The decoded behaviour, one sample per decode step, timestamped with the decode time."""

    def __init__(
        self, name: str, source_id: str, output: str, labels: list[str], rate: float
    ) -> None:
        self.labels = labels
        self.info = control_stream_info(name, source_id, output, labels, rate)
        self.outlet = pylsl.StreamOutlet(self.info, chunk_size=1, max_buffered=10)
        self.sample = np.zeros(len(labels), np.float32)  # reused each push

    def push(self, values: np.ndarray, t: float) -> None:
        self.sample[:] = values
        self.outlet.push_sample(self.sample, t)

    def have_consumers(self) -> bool:
        return self.outlet.have_consumers()
