"""The decode loop: absolute deadlines, one engine step per deadline, output to LSL.

Deadlines sit on an absolute grid ``k * hop`` of the LSL clock, so the loop never drifts
(it does not ``sleep(hop)``): it sleeps to just before the deadline, spins the last
``spin_us`` (Linux sleep overshoots by 50-100 us), reads the spikes that arrived, steps
the engine at the deadline time t, and pushes the output with timestamp t. A deadline
that passed before its step began is *missed* (skipped, counted); a step whose output
left after the next deadline is *late* (counted as missed too).

Priming (``prime_us``, when the hop leaves room for it): ``prime_us`` before each
deadline the loop reads the spikes that have arrived, pushes them (finishing a latent
group that ended, if one did) and runs the step graph once on that state, its output
thrown away. At 100 Hz the caches a step touches go cold in the 10 ms between steps: a
cold step cost 1.4-1.8 ms against 0.35-0.45 ms back to back on this VM. Primed, the
deadline's work is the last spikes' push and a warmer step (daemon, 60 s runs
interleaved: 1.65 -> 1.03 ms p50). Priming twice (2 ms and 0.6 ms before) gained another
0.3 ms in one process but nothing in the daemon (0.83-1.06 vs 0.99-1.07 ms), so it is
once. The output at t is the same function of the spikes up to t either way; the warm-up
run costs one more step of CPU per deadline.

Nothing a stream or a request does can end the loop: a failing step is counted, the
safe value is sent, and the engine is reset. An output that is not finite (NaN or inf,
from a poisoned table or weights) counts as a failing step: it is never sent. Engines are swapped between two steps
(``hand_over``): a model load or a calibration prepares and primes a new engine on
another thread, and the loop picks it up at its next deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pylsl

from bci_decoder.runtime.priority import realtime
from bci_decoder.runtime.ring import SpikeRing

log = logging.getLogger(__name__)

# pylsl.local_clock() is a ctypes call; time.monotonic() reads the same clock on Linux
# (both CLOCK_MONOTONIC). The offset is measured once so other platforms stay correct.
_CLOCK_OFFSET = pylsl.local_clock() - time.monotonic()


def lsl_clock() -> float:
    return time.monotonic() + _CLOCK_OFFSET


@dataclass
class ActiveEngine:
    """An engine ready to run, with everything the loop needs to feed it."""

    engine: object  # StreamingEngine: push(times, units), step(t) -> (D,)
    unit_map: np.ndarray  # (U_stream,) stream unit index -> engine unit index, -1 unknown
    cursor: int  # spike-ring cursor: the next spike this engine has not seen
    labels: list[str]  # output channel labels
    output: str
    session: str
    calibrated: bool
    model: str
    calibration: str | None = None
    # new unit tables for the same engine (a calibration): the loop calls
    # engine.set_units with them at the swap, so tables and unit_map change together
    tables: object | None = None


@dataclass
class LoopStats:
    steps: int = 0
    missed: int = 0  # deadlines skipped or outputs sent after the next deadline
    late: int = 0  # of which: sent after the next deadline
    errors: int = 0  # steps that raised (safe value sent instead)
    primes: int = 0  # deadlines primed (spikes pushed and the graph run before them)
    prime_errors: int = 0  # primings that raised (the engine is reset; the step goes on)
    # deadlines not primed: the loop came back from the step before after the priming
    # time (a slow step, or the CPU busy elsewhere)
    prime_skipped: int = 0
    safe_steps: int = 0  # steps that sent the safe value (stalled or error)
    spikes_in: int = 0  # spikes handed to the engine
    unknown_unit_spikes: int = 0
    ring_lost: int = 0  # spikes overwritten in the ring before the loop read them
    swaps: int = 0
    last_error: str = ""
    last_error_clock: float = float("-inf")  # LSL clock of the last failed step
    non_finite_outputs: int = 0  # of the errors: steps whose output had NaN/inf
    unknown_units: set[int] = field(default_factory=set)


class LatencyLog:
    """Preallocated ring of per-step latencies (ms); percentiles on request."""

    def __init__(self, capacity: int = 65536) -> None:
        self.values = np.zeros(capacity, np.float64)
        self.n = 0

    def add(self, ms: float) -> None:
        self.values[self.n % len(self.values)] = ms
        self.n += 1

    def last(self) -> float:
        return float(self.values[(self.n - 1) % len(self.values)]) if self.n else float("nan")

    def recent(self) -> np.ndarray:
        return self.values[: min(self.n, len(self.values))]

    def percentiles(self) -> dict[str, float | None]:
        v = self.recent()
        if not len(v):
            return {"p50": None, "p99": None, "p999": None, "max": None}
        p = np.percentile(v, [50, 99, 99.9])
        return {"p50": p[0], "p99": p[1], "p999": p[2], "max": float(v.max())}


class DecodeLoop(threading.Thread):
    """Runs until ``stop()``; reads ``ring``, steps the active engine, calls ``emit``."""

    def __init__(
        self,
        ring: SpikeRing,
        active: ActiveEngine,
        emit: Callable[[np.ndarray, float], None],
        *,
        cadence_hz: float,
        safe_output: str = "hold",
        stalled: Callable[[float], bool] = lambda now: False,
        spin_us: float = 150.0,
        trace_steps: int = 0,
        rt_priority: int | None = None,
        prime_us: float = 0.0,
    ) -> None:
        super().__init__(name="decode-loop", daemon=True)
        self.rt_priority = rt_priority  # SCHED_FIFO priority of this thread (priority.py)
        self.rt_error: str | None = None
        self.ring = ring
        self.active = active
        self.emit = emit
        self.hop = 1.0 / cadence_hz
        self.safe_output = safe_output
        self.is_stalled = stalled
        self.spin = spin_us * 1e-6
        # priming needs the step's own time before the deadline and as much again for
        # the deadline's work: off where the hop is shorter (1 kHz: caches stay warm)
        self.prime = prime_us * 1e-6 if 0 < 2 * prime_us * 1e-6 <= self.hop else 0.0
        self.stats = LoopStats()
        self.step_ms = LatencyLog()  # engine work per step (read + push + step)
        self.output_ms = LatencyLog()  # from the deadline to the output leaving
        self.stalled = True  # nothing received yet: the first step decides
        self._stop_event = threading.Event()
        self._pending: ActiveEngine | None = None
        self._logged_error = float("-inf")
        self.last_safe = False  # whether the last output sent was the safe value
        self._swapped = threading.Event()
        self._last = np.zeros(len(active.labels), np.float32)
        self._carry_t = np.zeros(0, np.float64)  # spikes read but newer than the last step
        self._carry_u = np.zeros(0, np.int32)
        # optional record of (step time, ring cursor after reading) for offline replays of
        # exactly what the loop saw (parity tests); preallocated, off by default
        self.trace_t = np.zeros(trace_steps, np.float64)
        self.trace_cursor = np.zeros(trace_steps, np.int64)

    # ---------------------------------------------------------------- control
    def stop(self) -> None:
        self._stop_event.set()

    def hand_over(self, new: ActiveEngine, wait: float = 2.0) -> bool:
        """Give the loop a new engine; it is used from the next step. Returns when the
        loop has switched (True) or after ``wait`` seconds (False)."""
        self._swapped.clear()
        self._pending = new
        if not self.is_alive():
            self.active, self._pending = new, None
            return True
        return self._swapped.wait(wait)

    @property
    def last_output(self) -> np.ndarray:
        """A copy of the last value sent (D,), for watchers on other threads (the page's
        feed): a read of two floats the loop may be rewriting, never a wait for it."""
        return self._last.copy()

    # ---------------------------------------------------------------- loop
    def _sleep_until(self, deadline: float) -> None:
        rest = deadline - lsl_clock() - self.spin
        if rest > 0:
            time.sleep(rest)
        while lsl_clock() < deadline:  # short spin: sleep alone overshoots
            pass

    def run(self) -> None:
        if self.rt_priority:
            self.rt_error = realtime(self.rt_priority)
            if self.rt_error:
                log.warning("decode loop stays at normal priority: %s", self.rt_error)
        hop = self.hop
        k = int(np.ceil(lsl_clock() / hop)) + 1  # deadlines at k * hop: absolute grid
        while not self._stop_event.is_set():
            deadline = k * hop
            if self.prime and lsl_clock() < deadline - self.prime:
                self._sleep_until(deadline - self.prime)
                self._prime(deadline)
            elif self.prime:
                self.stats.prime_skipped += 1
            self._sleep_until(deadline)
            now = lsl_clock()
            behind = int((now - deadline) // hop)
            if behind >= 1:  # we woke after later deadlines had passed: skip to the newest
                self.stats.missed += behind
                k += behind
                deadline = k * hop
            self._one_step(deadline)
            sent = lsl_clock()
            self.output_ms.add((sent - deadline) * 1e3)
            if sent > deadline + hop:
                self.stats.missed += 1
                self.stats.late += 1
            k += 1

    def _swap_if_pending(self) -> None:
        new = self._pending
        if new is None:
            return
        old, self.active, self._pending = self.active, new, None
        if new.tables is not None and new.engine is old.engine:
            # the same engine and ONNX Runtime session, new unit tables: it goes on from
            # where it was (cursor, spikes waiting for the next step)
            new.cursor = old.cursor
            new.engine.set_units(new.tables)
        else:
            self._carry_t, self._carry_u = self._carry_t[:0], self._carry_u[:0]
        if len(new.labels) != len(self._last):
            self._last = np.zeros(len(new.labels), np.float32)
        self.stats.swaps += 1
        self._swapped.set()

    def _read(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """The spikes in the ring with time <= t that the active engine has not had;
        newer ones wait in the carry for a later step."""
        act = self.active
        times, units, act.cursor, lost = self.ring.read_spikes(act.cursor)
        self.stats.ring_lost += lost
        if len(self._carry_t):
            times = np.concatenate([self._carry_t, times])
            units = np.concatenate([self._carry_u, units])
        # spikes newer than t wait for the next step (a step at t uses spikes <= t only)
        n_now = int(np.searchsorted(times, t, side="right"))
        self._carry_t, self._carry_u = times[n_now:], units[n_now:]
        return times[:n_now], units[:n_now]

    def _push(self, times: np.ndarray, units: np.ndarray) -> None:
        """Stream unit indices mapped to the engine's; unknown units counted, not pushed."""
        if not len(times):
            return
        act, st = self.active, self.stats
        mapped = np.full(len(units), -1, np.int64)
        inside = (units >= 0) & (units < len(act.unit_map))
        mapped[inside] = act.unit_map[units[inside]]
        unknown = mapped < 0
        if unknown.any():
            st.unknown_unit_spikes += int(unknown.sum())
            if len(st.unknown_units) < 100_000:
                st.unknown_units.update(np.unique(units[unknown]).tolist())
            times, mapped = times[~unknown], mapped[~unknown]
        act.engine.push(times, mapped)
        st.spikes_in += len(times)

    def _prime(self, deadline: float) -> None:
        """Before the deadline: push what has arrived and warm the step (module doc).
        Only on a live stream with no engine waiting to be swapped in: a stream coming
        back resets the engine at the step, and a new engine starts at the step."""
        if self.stalled or self._pending is not None or self.is_stalled(lsl_clock()):
            return
        try:
            self._push(*self._read(deadline))
            warm = getattr(self.active.engine, "warm", None)
            if warm is not None:
                warm()
            self.stats.primes += 1
        except Exception as e:  # noqa: BLE001 - the step at the deadline goes on
            self.stats.prime_errors += 1
            self.stats.last_error = f"priming: {type(e).__name__}: {e}"[:500]
            try:
                self.active.engine.reset()
            except Exception:  # noqa: BLE001
                pass

    def _one_step(self, t: float) -> None:
        t0 = time.perf_counter()
        self._swap_if_pending()
        act = self.active
        st = self.stats
        times, units = self._read(t)
        if st.steps < len(self.trace_t):
            self.trace_t[st.steps], self.trace_cursor[st.steps] = t, act.cursor
        stalled = self.is_stalled(t)
        try:
            if self.stalled and not stalled and st.spikes_in:
                act.engine.reset()  # the stream is back: start from its present
            self.stalled = stalled
            self._push(times, units)
            y = act.engine.step(t)
            if stalled:
                raise _Stalled
            if not np.isfinite(y).all():  # never send NaN/inf: the safe value goes out
                st.non_finite_outputs += 1
                raise NonFiniteOutput(f"the engine's output at t={t:.3f} is not finite: {y}")
            self._last[:] = y
            out = self._last
            self.last_safe = False
        except _Stalled:
            st.safe_steps += 1
            out = self._safe()
            self.last_safe = True
        except Exception as e:  # noqa: BLE001 - the loop must outlive any one step
            st.errors += 1
            st.safe_steps += 1
            st.last_error = f"{type(e).__name__}: {e}"[:500]
            st.last_error_clock = t
            self.last_safe = True
            if t - self._logged_error > 5.0:  # a broken model fails every step: log rarely
                self._logged_error = t
                log.exception("decode step at t=%.4f failed; sending the safe value", t)
            try:
                act.engine.reset()
            except Exception:  # noqa: BLE001
                pass
            out = self._safe()
        self.step_ms.add((time.perf_counter() - t0) * 1e3)
        self.emit(out, t)
        st.steps += 1

    def _safe(self) -> np.ndarray:
        if self.safe_output == "zero":
            return np.zeros_like(self._last)
        return self._last


class _Stalled(Exception):
    pass


class NonFiniteOutput(ValueError):
    """The engine produced NaN or inf: the step fails and the safe value is sent."""
