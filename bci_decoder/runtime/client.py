"""A receiving client: records the decoded stream (and optionally the behaviour stream)
with each sample's arrival time, as experiment software on the rig would.

Run as its own process by the demo and the benchmarks:
    python -m bci_decoder.runtime.client --stream decoded=Control:bci_decoder-control \\
        --stream behavior=Behavior --seconds 60 --out o.npz
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

import numpy as np
import pylsl

from bci_decoder.runtime.decode_loop import lsl_clock
from bci_decoder.runtime.lsl_io import resolve
from bci_decoder.serve_config import StreamSettings


class StreamRecorder:
    """Pull one stream into growing arrays: timestamps, values, arrival clock."""

    def __init__(self, query: StreamSettings, timeout: float = 30.0) -> None:
        info = resolve(query, timeout)
        if info is None:
            raise TimeoutError(f"no LSL stream {query} within {timeout} s")
        same_host = info.hostname() == socket.gethostname()  # see lsl_io.InletThread.run
        flags = 0 if same_host else pylsl.proc_clocksync
        self.inlet = pylsl.StreamInlet(info, max_buflen=30, processing_flags=flags)
        self.inlet.open_stream(timeout=5.0)
        self.channels = info.channel_count()
        self.buf = np.zeros((1024, self.channels), np.float32)
        self.times: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.arrival: list[np.ndarray] = []

    def pull(self, timeout: float = 0.05) -> int:
        data, ts = self.inlet.pull_chunk(
            timeout=timeout, max_samples=len(self.buf), dest_obj=self.buf, min_samples=1,
            as_numpy=True,
        )  # fmt: skip
        n = len(ts)
        if n:
            now = lsl_clock()
            self.times.append(np.asarray(ts, np.float64))
            self.values.append(data.copy())
            self.arrival.append(np.full(n, now))
        return n

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.times:
            return np.zeros(0), np.zeros((0, self.channels), np.float32), np.zeros(0)
        return np.concatenate(self.times), np.concatenate(self.values), np.concatenate(self.arrival)


def record(
    queries: dict[str, StreamSettings], seconds: float, out: str, timeout: float = 30.0
) -> None:
    """Record several streams for ``seconds`` (or until SIGTERM), one thread each so a
    blocking pull on one never delays the other's arrival times; arrays are saved as
    ``<key>_timestamps``, ``<key>_values``, ``<key>_arrival``."""
    recs = {k: StreamRecorder(q, timeout) for k, q in queries.items()}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def pull(rec: StreamRecorder) -> None:
        while not stop.is_set():
            rec.pull(timeout=0.1)

    threads = [threading.Thread(target=pull, args=(r,), daemon=True) for r in recs.values()]
    for th in threads:
        th.start()
    stop.wait(seconds)
    stop.set()
    for th in threads:
        th.join(timeout=2.0)
    arrays = {}
    for k, rec in recs.items():
        t, x, a = rec.arrays()
        arrays |= {f"{k}_timestamps": t, f"{k}_values": x, f"{k}_arrival": a}
    np.savez(out, **arrays)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--stream", action="append", required=True, metavar="KEY=TYPE[:SOURCE_ID]",
        help="a stream to record, e.g. decoded=Control:bci_decoder-control (repeatable)",
    )  # fmt: skip
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    queries = {}
    for item in a.stream:
        key, _, spec = item.partition("=")
        kind, _, sid = spec.partition(":")
        if not key or not kind:
            p.error(f"--stream {item!r}: expected KEY=TYPE[:SOURCE_ID]")
        queries[key] = StreamSettings(type=kind, source_id=sid or None)
    try:
        record(queries, a.seconds, a.out, a.timeout)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
