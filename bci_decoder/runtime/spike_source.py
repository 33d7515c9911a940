"""A synthetic spike source over LSL, in its own process: the load a rig puts on the
daemon, without the simulator's cost (fault tests and ``benchmarks/load_soak.py``).

Poisson spikes of ``units`` units at ``rate_hz`` each, pushed every ``chunk_ms`` on
absolute deadlines, each spike stamped at a time inside its chunk (never ahead of the
clock), on a ``Spikes`` stream with a ``seq`` channel so the daemon counts what LSL lost.
``--burst N --burst-at S`` adds N spikes spread over the second from S (the issue's "1M
spikes in 1 s"). Stream unit k is labelled ``labels[k % len(labels)]``: with the labels of
a session the model knows, every spike reaches the engine, whatever ``units`` is.

    python -m bci_decoder.runtime.spike_source --source-id X --labels units.txt \\
        --session sim7_s0 --units 2000 --rate-hz 50 --seconds 120

At the end it prints one JSON line: spikes sent (in all, in the burst), chunks pushed
more than a chunk late, and the LSL time the streaming started.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pylsl

from bci_decoder.runtime.decode_loop import lsl_clock
from bci_decoder.runtime.lsl_io import spike_stream_info


def run(
    source_id: str,
    labels: list[str],
    *,
    session: str = "",
    units: int | None = None,
    rate_hz: float = 20.0,
    seconds: float = 10.0,
    chunk_ms: float = 5.0,
    burst: int = 0,
    burst_at: float = 0.0,
    burst_s: float = 1.0,
    wait_s: float = 30.0,
    start_delay_s: float = 0.0,
    linger_s: float = 1.0,
    go_file: str | None = None,
    seed: int = 0,
    stop: threading.Event | None = None,
) -> dict:
    units = units or len(labels)
    names = [labels[k % len(labels)] for k in range(units)]
    info = spike_stream_info("spike_source", source_id, names, session)
    # max_buffered counts hundreds of samples for an irregular stream: room for the burst
    # and 10 s of the steady rate, for a receiver that falls behind
    room = burst + 10 * units * rate_hz
    outlet = pylsl.StreamOutlet(info, chunk_size=0, max_buffered=int(room // 100) + 100)
    stop = stop or threading.Event()
    if wait_s > 0 and not outlet.wait_for_consumers(wait_s):
        return {"error": f"no receiver within {wait_s} s", "sent": 0}
    while go_file and not Path(go_file).exists():  # the receiver says when to begin
        if stop.wait(0.01):
            break
    if stop.wait(start_delay_s):
        return {"sent": 0, "sent_burst": 0, "late_chunks": 0, "started": lsl_clock()}
    rng = np.random.default_rng(seed)
    dt = chunk_ms * 1e-3
    lam = units * rate_hz * dt  # spikes per chunk
    sent = sent_burst = late = 0
    seq = 0
    base = lsl_clock()
    prev = base
    k = 1
    while not stop.is_set():
        deadline = base + k * dt
        rest = deadline - lsl_clock()
        if rest > 0:
            time.sleep(rest)
        elif rest < -dt:
            late += 1
        now = lsl_clock()
        n = int(rng.poisson(lam * (now - prev) / dt))
        extra = 0
        if burst and now - base >= burst_at and sent_burst < burst:
            # the burst's share of this chunk, so it spreads over burst_s
            done = min(1.0, (now - base - burst_at) / burst_s)
            extra = max(0, int(burst * done) - sent_burst)
        total = n + extra
        if total:
            stamps = np.sort(rng.uniform(prev, now, total))
            rows = np.empty((total, 2), np.int32)
            rows[:, 0] = rng.integers(0, units, total)
            rows[:, 1] = (seq + np.arange(total)) % 2**31
            outlet.push_chunk(rows, stamps.tolist())
            seq += total
            sent += total
            sent_burst += extra
        prev = now
        if now - base >= seconds:
            break
        k = max(k + 1, int((now - base) / dt) + 1)  # after a stall: on, not catching up
    # LSL drops what a destroyed outlet has not sent yet: give the receivers time to
    # take the last chunks (a burst can leave seconds of them queued)
    stop.wait(linger_s)
    return {"sent": sent, "sent_burst": sent_burst, "late_chunks": late, "started": base}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source-id", required=True)
    p.add_argument("--labels", type=Path, required=True, help="unit labels, one per line")
    p.add_argument("--session", default="", help="desc/session of the stream")
    p.add_argument("--units", type=int, default=None, help="stream units (default: labels)")
    p.add_argument("--rate-hz", type=float, default=20.0, help="per unit")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--chunk-ms", type=float, default=5.0)
    p.add_argument("--burst", type=int, default=0, help="extra spikes over --burst-s")
    p.add_argument("--burst-at", type=float, default=0.0, help="s after the start")
    p.add_argument("--burst-s", type=float, default=1.0)
    p.add_argument("--wait-s", type=float, default=30.0, help="wait this long for a receiver")
    p.add_argument("--start-delay-s", type=float, default=0.0, help="then this long")
    p.add_argument("--linger-s", type=float, default=1.0, help="outlet kept after the end")
    p.add_argument("--go-file", help="after a receiver connects, wait for this file to exist")
    a = p.parse_args(argv)
    labels = [x for x in a.labels.read_text().splitlines() if x]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    res = run(
        a.source_id, labels, session=a.session, units=a.units, rate_hz=a.rate_hz,
        seconds=a.seconds, chunk_ms=a.chunk_ms, burst=a.burst, burst_at=a.burst_at,
        burst_s=a.burst_s, wait_s=a.wait_s, start_delay_s=a.start_delay_s,
        linger_s=a.linger_s, go_file=a.go_file, stop=stop,
    )  # fmt: skip
    print(json.dumps(res), flush=True)
    return 2 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
