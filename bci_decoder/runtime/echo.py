"""The LSL floor: the daemon's inlet, ring and deadline loop with a trivial engine.

``benchmarks/e2e_latency.py`` runs this beside the daemon on the same replayed stream:
what the echo path costs (LSL hops, scheduling, Python) is the floor under the
daemon's latency; the difference is the decoding.

    python -m bci_decoder.runtime.echo --spikes-source-id ID --source-id OUT --cadence 100
"""

from __future__ import annotations

import argparse
import signal
import threading

import numpy as np

from bci_decoder.runtime.decode_loop import ActiveEngine, DecodeLoop
from bci_decoder.runtime.lsl_io import ControlOutlet, SpikeInletThread
from bci_decoder.runtime.priority import realtime_process, support_priority
from bci_decoder.runtime.ring import SpikeRing
from bci_decoder.serve_config import StreamSettings


class EchoEngine:
    """Engine interface, no model: the output is the number of spikes seen so far."""

    def __init__(self) -> None:
        self.seen = 0
        self.out = np.zeros(2, np.float32)

    def push(self, times: np.ndarray, units: np.ndarray) -> int:
        self.seen += len(times)
        return len(times)

    def step(self, t: float) -> np.ndarray:
        self.out[0] = self.seen
        return self.out

    def reset(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--spikes-source-id", required=True)
    p.add_argument("--source-id", default="bci_echo")
    p.add_argument("--cadence", type=float, default=100.0)
    p.add_argument("--realtime-priority", type=int, default=None, metavar="P",
                   help="SCHED_FIFO P for the loop and the inlet and P-10 for the other "
                   "threads, as bci-decoder serve with realtime_priority: P (default: normal)")  # fmt: skip
    a = p.parse_args(argv)
    rt = a.realtime_priority
    ring = SpikeRing(4_000_000)
    inlet = SpikeInletThread(
        StreamSettings(type="Spikes", source_id=a.spikes_source_id), ring, rt_priority=rt
    )
    inlet.start()
    outlet = ControlOutlet("bci_echo", a.source_id, "echo", ["seen", "zero"], a.cadence)
    inlet.connected.wait()
    unit_map = np.arange(max(len(inlet.labels), 1) + 1_000_000, dtype=np.int64)
    active = ActiveEngine(EchoEngine(), unit_map, ring.written, ["seen", "zero"], "echo", "echo",
                          True, "echo")  # fmt: skip
    loop = DecodeLoop(ring, active, outlet.push, cadence_hz=a.cadence, rt_priority=rt)
    loop.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        # the other threads as the daemon's supervisor keeps them (threads started by
        # real-time ones come up normal)
        while not done.wait(1.0):
            if rt:
                realtime_process(support_priority(rt))
    except KeyboardInterrupt:
        pass
    loop.stop()
    inlet.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
