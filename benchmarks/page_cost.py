"""Cost of watching: the e2e latency benchmark with 5 monitoring pages open vs none.

Runs ``benchmarks/e2e_latency.py``'s whole pipeline (replay -> daemon -> LSL -> client,
with the echo floor) ``--repeats`` times per arm, interleaved A B B A ..., so slow drift of
the machine's load hits both arms alike. The pages are SSE clients of ``/live/events``
(the feed a browser's page reads; the browser's own drawing is not on the daemon's CPU
here, but this machine has 2 cores, so it would compete on a rig that shared them).
Reported per arm: missed deadlines and output latency p50/p99 per run, and their medians;
the spread between runs of the same arm is the noise the difference is judged against.

    .venv/bin/python benchmarks/page_cost.py --seconds 30 --repeats 4 --json benchmarks/results/page_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
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


class ThreadCPU:
    """Samples the CPU time of each thread of the daemon (``bci_decoder.cli serve`` with a
    config under ``marker``) every ``period`` s from /proc, to say where watching costs:
    the main thread is uvicorn's (the page's feed and every page's sends run there), the
    SCHED_FIFO threads are the decode loop and the spike inlet, the rest the behaviour inlet,
    the supervisor and the recorder."""

    def __init__(self, marker: str, period: float = 0.25) -> None:
        self.marker, self.period = marker, period
        self.samples: list[tuple[float, dict[int, tuple[float, int]]]] = []
        self.pid: int | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _find(self, command: str) -> int | None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"bci_decoder.cli {command}" in cmd and self.marker in cmd:
                return int(proc.name)
        return None

    def _run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        replay = None
        while not self.stop_event.wait(self.period):
            if self.pid is None:
                self.pid = self._find("serve")
                continue
            if replay is None:
                replay = self._find("replay")
            # the replay's lifetime is the span the benchmark measures (decoding)
            if replay is None or not Path(f"/proc/{replay}").exists():
                if self.samples:
                    return
                continue
            threads = {}
            try:
                for task in Path(f"/proc/{self.pid}/task").iterdir():
                    f = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    # utime + stime (fields 14, 15), scheduling policy (field 41; 1 = FIFO)
                    threads[int(task.name)] = ((int(f[11]) + int(f[12])) / tick, int(f[38]))
            except (OSError, IndexError, ValueError):
                if self.samples:
                    return  # the daemon ended
                continue
            self.samples.append((time.monotonic(), threads))

    def stop(self) -> dict:
        """CPU ms per wall second of each thread group while the replay ran, less its first
        3 s (the pages open once the loop runs)."""
        self.stop_event.set()
        self.thread.join(timeout=5)
        s = self.samples
        if len(s) < 2 or self.pid is None:
            return {}
        i0 = next((i for i, (w, _) in enumerate(s) if w >= s[0][0] + 3.0), len(s) - 1)
        (w0, a), (w1, b) = s[i0], s[-1]
        if w1 - w0 < 1.0:
            return {}

        def group(th: dict, which: str) -> float:
            return sum(c for tid, (c, pol) in th.items()
                       if (which == "main" and tid == self.pid)
                       or (which == "fifo" and pol == 1)
                       or (which == "other" and tid != self.pid and pol != 1))  # fmt: skip

        return {f"{g}_cpu_ms_per_s": 1e3 * (group(b, g) - group(a, g)) / (w1 - w0)
                for g in ("main", "fifo", "other")} | {"span_s": w1 - w0}  # fmt: skip


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
        "main_thread_cpu_ms_per_s": [r["threads"].get("main_cpu_ms_per_s") for r in runs],
        "fifo_threads_cpu_ms_per_s": [r["threads"].get("fifo_cpu_ms_per_s") for r in runs],
    }


def table(res: dict) -> str:
    lines = [f"{'pages':>5} {'run':>3} {'steps':>6} {'missed':>6} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'echo p99':>8} {'CPU %':>6} {'msg/s/page':>10} {'main ms/s':>9} {'FIFO ms/s':>9}"]  # fmt: skip
    for r in res["runs"]:
        w = r["watching"]
        rate = np.mean(w["messages_per_s"]) if w.get("messages_per_s") else 0.0
        o = r["output_latency_ms"]
        lines.append(
            f"{w['pages']:>5} {r['index']:>3} {r['steps']:>6} {r['missed']:>6} {o['p50']:>7.3f} "
            f"{o['p99']:>7.3f} {r['echo_latency_ms']['p99']:>8.3f} "
            f"{r['daemon_cpu_percent']:>6.0f} {rate:>10.1f} "
            f"{r['threads'].get('main_cpu_ms_per_s', float('nan')):>9.1f} "
            f"{r['threads'].get('fifo_cpu_ms_per_s', float('nan')):>9.1f}"
        )
    for pages, s in res["arms"].items():
        lines.append(f"{pages} pages: median missed {s['median_missed']:g}, output p50 "
                     f"{s['median_p50_ms']:.3f} ms, p99 {s['median_p99_ms']:.3f} ms")  # fmt: skip
    return "\n".join(lines)


def plot(res: dict, png: Path) -> Path:
    """Per run, each arm side by side: missed deadlines, output p99 and uvicorn's thread
    CPU (the watching cost), the median of each arm as a bar behind its runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(res["arms"])
    panels = [("missed", "missed deadlines per run", False),
              ("output_p99_ms", "output latency p99 (ms)", True),
              ("main_thread_cpu_ms_per_s", "uvicorn thread CPU (ms per s)", False)]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for i, arm in enumerate(arms):
            vals = [v for v in res["arms"][arm][key] if v is not None]
            colour = "tab:gray" if int(arm) == 0 else "tab:red"
            if vals:
                ax.bar(i, float(np.median(vals)), 0.6, color=colour, alpha=0.3)
                ax.plot(np.full(len(vals), i) + np.linspace(-0.15, 0.15, len(vals)), vals, "o",
                        color=colour)  # fmt: skip
        ax.set_xticks(range(len(arms)), [f"{a} pages" for a in arms])
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
    load = res["info"]["load_average"][0], res["info"]["load_average_end"][0]
    n = res["arms"][arms[0]]["runs"]
    fig.suptitle(f"Cost of watching: {n} interleaved runs per arm, 200 units at 100 Hz "
                 f"(load {load[0]:.0f}-{load[1]:.0f} on {res['info']['cpus']} cores); "
                 "dots: runs, bars: medians", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


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
            cpu = ThreadCPU(tmp)
            try:
                r = run(a.units, a.cadence, a.seconds, a.model, Path(tmp), pages=pages)
            finally:
                r_cpu = cpu.stop()
        r["threads"] = r_cpu
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
        print(f"wrote {a.json} and {plot(res, a.json.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
