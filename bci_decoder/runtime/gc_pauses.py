"""Keep Python's cyclic garbage collector off the decode loop's deadlines.

A daemon that has imported torch, onnxruntime, FastAPI and pydantic and loaded a model
holds about 250,000 GC-tracked objects. A full (generation 2) collection walks all of
them: 150 ms on this machine, during which the collecting thread holds the GIL and the
decode loop cannot run: 15 missed deadlines at 100 Hz, whatever thread triggered it.

``freeze()`` moves every object alive now into the permanent generation (``gc.freeze``),
which collections skip; call it once start-up is done, and again after a new engine or
model is built (``gc.freeze`` itself costs microseconds, it collects nothing).
``GcMonitor`` times every collection so /status shows what they cost.

Measured (benchmarks/swap_gap.py: 9 model swaps each way, stevenson2011_m1 at 100 Hz):
with the freeze the largest output interval around a swap was 40-50 ms, without it
10 ms, and no full collection happened in either; so the daemon's ``gc_freeze`` is off by default and
the monitor stays on.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field


def freeze(collect: bool = False) -> int:
    """Move all live objects to the permanent generation; returns how many are frozen.

    ``collect`` first runs a full collection (slow with a big heap: only before the
    decode loop runs)."""
    if collect:
        gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@dataclass
class GcStats:
    collections: list[int] = field(default_factory=lambda: [0, 0, 0])  # per generation
    longest_ms: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    total_ms: float = 0.0
    over_5ms: int = 0  # collections that took longer than 5 ms

    def public(self) -> dict:
        return {
            "collections": list(self.collections),
            "longest_ms": [round(x, 3) for x in self.longest_ms],
            "total_ms": round(self.total_ms, 3),
            "over_5ms": self.over_5ms,
            "frozen_objects": gc.get_freeze_count(),
        }


class GcMonitor:
    """Times the collector through ``gc.callbacks`` (process-wide; one per daemon)."""

    def __init__(self) -> None:
        self.stats = GcStats()
        self._t0 = threading.local()
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0.t = time.perf_counter()
            return
        t0 = getattr(self._t0, "t", None)
        if t0 is None:
            return
        ms = (time.perf_counter() - t0) * 1e3
        g = int(info.get("generation", 2))
        st = self.stats
        st.collections[g] += 1
        st.longest_ms[g] = max(st.longest_ms[g], ms)
        st.total_ms += ms
        st.over_5ms += ms > 5.0

    def close(self) -> None:
        try:
            gc.callbacks.remove(self._callback)
        except ValueError:
            pass
