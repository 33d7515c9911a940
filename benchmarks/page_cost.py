"""Cost of watching: the e2e latency benchmark with 5 monitoring pages open vs none.

Runs ``benchmarks/e2e_latency.py``'s whole pipeline (replay -> daemon -> LSL -> client,
with the echo floor) ``--repeats`` times per arm, interleaved A B B A ..., so slow drift of
the machine's load hits both arms alike. The pages are SSE clients of ``/live/events``
(the feed a browser's page reads; the browser's own drawing is not on the daemon's CPU
here, but this machine has 2 cores, so it would compete on a rig that shared them).
Reported per arm: missed deadlines and output latency p50/p99 per run, and their medians;
the spread between runs of the same arm is the noise the difference is judged against.

    .venv/bin/python benchmarks/page_cost.py --seconds 30 --repeats 2 --json benchmarks/results/page_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.e2e_latency import run  # noqa: E402


def run_info() -> dict:
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
            return out.stdout.strip()
        except OSError:
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
    }


def order(arms: list[int], repeats: int) -> list[int]:
    """A B, B A, A B, ...: each arm first in half the rounds."""
    seq = []
    for r in range(repeats):
        seq += arms if r % 2 == 0 else arms[::-1]
    return seq


def summary(runs: list[dict]) -> dict:
    missed = [r["missed"] for r in runs]
    p50 = [r["output_latency_ms"]["p50"] for r in runs]
    p99 = [r["output_latency_ms"]["p99"] for r in runs]
    return {
        "runs": len(runs),
        "missed": missed,
        "output_p50_ms": p50,
        "output_p99_ms": p99,
        "echo_p99_ms": [r["echo_latency_ms"]["p99"] for r in runs],
        "median_missed": float(np.median(missed)),
        "median_p50_ms": float(np.median(p50)),
        "median_p99_ms": float(np.median(p99)),
        "daemon_cpu_percent": [r["daemon_cpu_percent"] for r in runs],
    }


def table(res: dict) -> str:
    lines = [f"{'pages':>5} {'run':>3} {'steps':>6} {'missed':>6} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'echo p99':>8} {'CPU %':>6} {'msg/s/page':>10}"]  # fmt: skip
    for r in res["runs"]:
        w = r["watching"]
        rate = np.mean(w["messages_per_s"]) if w.get("messages_per_s") else 0.0
        o = r["output_latency_ms"]
        lines.append(
            f"{w['pages']:>5} {r['index']:>3} {r['steps']:>6} {r['missed']:>6} {o['p50']:>7.3f} "
            f"{o['p99']:>7.3f} {r['echo_latency_ms']['p99']:>8.3f} "
            f"{r['daemon_cpu_percent']:>6.0f} {rate:>10.1f}"
        )
    for pages, s in res["arms"].items():
        lines.append(f"{pages} pages: median missed {s['median_missed']:g}, output p50 "
                     f"{s['median_p50_ms']:.3f} ms, p99 {s['median_p99_ms']:.3f} ms")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pages", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm")
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--cadence", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--model", default="poyo-mp-small")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    info = run_info()
    runs = []
    for i, pages in enumerate(order([0, a.pages], a.repeats)):
        with tempfile.TemporaryDirectory(prefix="page-cost-") as tmp:
            r = run(a.units, a.cadence, a.seconds, a.model, Path(tmp), pages=pages)
        r["index"] = i
        runs.append(r)
        o = r["output_latency_ms"]
        print(f"run {i}: {pages} pages, {r['missed']} missed, p99 {o['p99']:.3f} ms", flush=True)
    arms = {p: summary([r for r in runs if r["watching"]["pages"] == p]) for p in (0, a.pages)}
    res = {"info": info | {"load_average_end": list(os.getloadavg())}, "runs": runs, "arms": arms}
    print(table(res))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
