"""End-to-end latency: replay -> daemon -> LSL outlet -> client, beside the LSL floor.

One run, four processes on this machine: ``bci-decoder replay`` streams N units at 20 Hz
(Poisson) in 1 ms chunks; the daemon (``bci-decoder serve``, shipped model with the
units added as a calibration) decodes at the cadence; an echo process (the daemon's
inlet, ring and deadline loop with no model) forwards at the same cadence; a client
process records both outputs with their arrival times. Reported:
  output_latency_ms    local_clock() at arrival - the output's timestamp (decode time t)
  spike_to_output_ms   arrival - push time of the newest spike the output could include
  echo_latency_ms      the same as output latency, for the echo path (the floor)
  daemon_cpu_percent   the daemon's CPU time / wall time over the replay (100 = one core)
Goals (issue): 200 units, 100 Hz, 5 min: 0 missed; p50 <= echo p50 + 0.5 ms; p99 <= 2x echo.
--compare realtime|gc runs a second daemon on the same stream with that setting flipped
(realtime: at normal priority; gc: with the start-up heap frozen out of the GC).
--pages N keeps N monitoring pages (SSE clients of /live/events) open during the replay;
benchmarks/page_cost.py compares 0 and 5 pages in interleaved runs.

    .venv/bin/python benchmarks/e2e_latency.py --units 200 --cadence 100 --seconds 300 --json out/e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bci_decoder.calibrate import add_session  # noqa: E402
from bci_decoder.data.nwb import write_nwb  # noqa: E402
from bci_decoder.model import layout  # noqa: E402
from bci_decoder.runtime.processes import ProcessGroup, free_port, wait_http  # noqa: E402
from bci_decoder.train.checkpoint import Decoder, Normalizer  # noqa: E402
from benchmarks.engine_latency import stream as poisson_session  # noqa: E402

# --compare: (label, the second daemon's config changes)
COMPARE = {
    "gc": ("GC frozen", {"gc_freeze": True}),
    "prime": ("not primed", {"prime_us": 0.0}),
    "realtime": ("normal priority", {"realtime_priority": None}),
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(x: np.ndarray) -> dict[str, float | None]:
    if not len(x):
        return {"p50": None, "p99": None, "p999": None}
    p = np.percentile(x, [50, 99, 99.9])
    return {"p50": float(p[0]), "p99": float(p[1]), "p999": float(p[2])}


class PageWatchers:
    """``n`` monitoring pages: threads holding ``/live/events`` open, counting messages
    (parsing only the last one, so watching here costs the machine little)."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.stop_event = url, threading.Event()
        self.counts, self.last = [0] * n, [""] * n
        self.threads = [threading.Thread(target=self._watch, args=(i,), daemon=True)
                        for i in range(n)]  # fmt: skip
        self.t0 = time.monotonic()
        for th in self.threads:
            th.start()

    def _watch(self, i: int) -> None:
        with httpx.stream("GET", self.url + "/live/events", timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.counts[i] += 1
                    self.last[i] = line
                if self.stop_event.is_set():
                    return

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        self.stop_event.set()
        for th in self.threads:
            th.join(timeout=5)
        feed = {}
        for line in self.last:
            msg = json.loads(line[6:]) if line else {}
            feed = msg.get("feed", feed)
        return {"pages": len(self.threads), "messages_per_s": [c / wall for c in self.counts],
                "feed": feed}  # fmt: skip


def run(
    units: int,
    cadence: float,
    seconds: float,
    model: str,
    work: Path,
    realtime_priority: int | None = 50,
    compare: str | None = None,
    pages: int = 0,
    prime_us: float | None = None,
) -> dict:
    tag = uuid.uuid4().hex[:8]
    session = poisson_session(units, seconds + 5.0)
    models = work / "models"
    shutil.copytree(ROOT / "models" / model, models / model, dirs_exist_ok=True)
    base = Decoder.load(models / model)
    cal = add_session(base, session, "hand_vel", Normalizer.fit(session.behavior["hand_vel"].data))
    cal.info = dict(cal.info) | {"calibration": {"session": session.session_id}}
    cal.save(layout.calibration_dir(models / model, "bench"))
    nwb = write_nwb(session, work / "bench.nwb")
    port, token = free_port(), secrets.token_urlsafe(16)
    spikes_id, control_id, echo_id = f"e2e-{tag}", f"e2e-{tag}-control", f"e2e-{tag}-echo"
    cfg = {
        "model": model, "models_dir": str(models), "calibration": "bench",
        "cadence_hz": cadence, "autostart": True, "behavior": None,
        "realtime_priority": realtime_priority,
        "state_dir": str(ROOT / "out" / "bench-serve"),  # keeps the ONNX export between runs
        "spikes": {"type": "Spikes", "source_id": spikes_id}, "control_source_id": control_id,
        "api": {"host": "127.0.0.1", "port": port, "token": token},
    }  # fmt: skip
    if prime_us is not None:
        cfg["prime_us"] = prime_us
    (work / "serve.yaml").write_text(yaml.safe_dump(cfg))
    # --compare SETTING: a second daemon on the same stream with that setting flipped, side
    # by side in the same run (the same machine noise hits both)
    nf_port, nf_id = free_port(), f"e2e-{tag}-other"
    nf_cfg = cfg | (COMPARE[compare][1] if compare else {}) | {
        "control_source_id": nf_id, "api": cfg["api"] | {"port": nf_port}}  # fmt: skip
    (work / "serve-other.yaml").write_text(yaml.safe_dump(nf_cfg))
    comparing = compare is not None
    procs = ProcessGroup(work / "logs")
    url = f"http://127.0.0.1:{port}"
    nf_url = f"http://127.0.0.1:{nf_port}"
    try:
        serve = procs.python("serve", ["-m", "bci_decoder.cli", "serve", "--config",
                                       str(work / "serve.yaml")])  # fmt: skip
        if comparing:
            procs.python("serve-other", ["-m", "bci_decoder.cli", "serve", "--config",
                                         str(work / "serve-other.yaml")])  # fmt: skip
            wait_http(nf_url + "/health", 180, lambda: procs.check("serve-other"))
        # the echo at the daemon's priority, so the floor is fair
        rt_echo = ["--realtime-priority", str(realtime_priority)] if realtime_priority else []
        procs.python("echo", ["-m", "bci_decoder.runtime.echo", "--spikes-source-id", spikes_id,
                              "--source-id", echo_id, "--cadence", str(cadence), *rt_echo])  # fmt: skip
        wait_http(url + "/health", 180, lambda: procs.check("serve"))
        extra = ["--stream", f"other=Control:{nf_id}"] if comparing else []
        procs.python("client", ["-m", "bci_decoder.runtime.client",
                                "--stream", f"decoded=Control:{control_id}",
                                "--stream", f"echo=Control:{echo_id}", *extra,
                                "--seconds", str(seconds + 25), "--out", str(work / "client.npz")])  # fmt: skip
        procs.python("replay", ["-m", "bci_decoder.cli", "replay", str(nwb), "--seconds",
                                str(seconds), "--source-id", spikes_id, "--log",
                                str(work / "replay.npz")])  # fmt: skip
        deadline = time.monotonic() + 60
        while httpx.get(url + "/status").json()["state"] != "running":
            procs.check("serve")
            procs.check("replay")
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon did not start decoding")
            time.sleep(0.1)
        if comparing:
            while httpx.get(nf_url + "/status").json()["state"] != "running":
                procs.check("serve-other")
                if time.monotonic() > deadline:
                    raise TimeoutError("the second daemon did not start decoding")
                time.sleep(0.1)
        st0 = httpx.get(url + "/status").json()
        nf0 = httpx.get(nf_url + "/status").json() if comparing else None
        watchers = PageWatchers(url, pages) if pages else None
        cpu0, wall0 = cpu_seconds(serve.pid), time.monotonic()
        print(f"decoding {units} units at {cadence:g} Hz for {seconds:g} s, {pages} pages "
              "open ...", flush=True)  # fmt: skip
        procs.wait("replay", seconds + 60)
        cpu1, wall1 = cpu_seconds(serve.pid), time.monotonic()
        st1 = httpx.get(url + "/status").json()
        watched = watchers.stop() if watchers else {"pages": 0}
        nf1 = httpx.get(nf_url + "/status").json() if comparing else None
        procs.wait("client", seconds + 60)
    finally:
        procs.stop_all()
    rec = np.load(work / "client.npz")
    log = np.load(work / "replay.npz")
    td, ad = rec["decoded_timestamps"], rec["decoded_arrival"]
    te, ae = rec["echo_timestamps"], rec["echo_arrival"]
    lo, hi = log["spike_time"][0], log["spike_time"][-1]
    keep_d, keep_e = (td > lo + 1.0) & (td < hi), (te > lo + 1.0) & (te < hi)
    st, pc = log["spike_time"], log["push_clock"]
    j = np.minimum(np.searchsorted(st, td, "right"), np.searchsorted(pc, td, "right")) - 1
    ok = keep_d & (j >= 0)
    out = {
        "cadence_hz": cadence,
        "prime_us": prime_us,  # None: the serve config's default
        "units": units,
        "seconds": seconds,
        "steps": st1["steps"] - st0["steps"],
        "missed": st1["missed_deadlines"] - st0["missed_deadlines"],
        "dropped": sum(st1["dropped"].values()),
        "dropped_by_reason": {k: v for k, v in st1["dropped"].items() if v},
        # spikes that came after their group was finished but within late_grace_s
        "late_accepted": (st1.get("engine") or {}).get("late_accepted", 0)
        - (st0.get("engine") or {}).get("late_accepted", 0),
        "output_latency_ms": pct((ad - td)[keep_d] * 1e3),
        "spike_to_output_ms": pct((ad[ok] - pc[j[ok]]) * 1e3),
        "echo_latency_ms": pct((ae - te)[keep_e] * 1e3),
        "daemon_cpu_percent": 100.0 * (cpu1 - cpu0) / (wall1 - wall0),
        "step_ms": st1["latency"]["step_ms"],
        "outputs_received": int(keep_d.sum()),
        "echo_received": int(keep_e.sum()),
        "gc": st1["gc"],
        "realtime": st1["realtime"],
        "watching": watched,
    }
    if comparing:
        tn, an = rec["other_timestamps"], rec["other_arrival"]
        keep_n = (tn > lo + 1.0) & (tn < hi)
        out["compare"] = {
            "without": compare,
            "label": COMPARE[compare][0],
            "steps": nf1["steps"] - nf0["steps"],
            "missed": nf1["missed_deadlines"] - nf0["missed_deadlines"],
            "output_latency_ms": pct((an - tn)[keep_n] * 1e3),
            "gc": nf1["gc"],
            "realtime": nf1["realtime"],
        }
    return out


def table(r: dict) -> str:
    def row(name: str, d: dict) -> str:
        return f"{name:<22}{d['p50']:>9.3f}{d['p99']:>9.3f}{d['p999']:>9.3f}"

    lines = [
        f"{r['units']} units at 20 Hz, {r['cadence_hz']:g} Hz cadence, {r['seconds']:g} s: "
        f"{r['steps']} steps, {r['missed']} missed ({100 * r['missed'] / max(r['steps'], 1):.2f}%), "
        f"{r['dropped']} dropped ({r.get('late_accepted', 0)} late ones kept), "
        f"daemon CPU {r['daemon_cpu_percent']:.0f}%",
        f"{'latency (ms)':<22}{'p50':>9}{'p99':>9}{'p99.9':>9}",
        row("output (daemon)", r["output_latency_ms"]),
        row("spike -> output", r["spike_to_output_ms"]),
        row("echo (LSL floor)", r["echo_latency_ms"]),
    ]
    nf = r.get("compare")
    if nf:
        lines.append(row(f"output, {nf['label']}", nf["output_latency_ms"]))
        lines.append(
            f"missed deadlines: {r['missed']} (this daemon) vs {nf['missed']} ({nf['label']}); "
            f"longest full collection {r['gc']['longest_ms'][2]:.1f} vs "
            f"{nf['gc']['longest_ms'][2]:.1f} ms; collections over 5 ms "
            f"{r['gc']['over_5ms']} vs {nf['gc']['over_5ms']}"
        )
    e, o = r["echo_latency_ms"], r["output_latency_ms"]
    lines.append(
        f"goals: p50 <= echo p50 + 0.5 ms: {o['p50']:.3f} <= {e['p50'] + 0.5:.3f} "
        f"{'met' if o['p50'] <= e['p50'] + 0.5 else 'MISSED'}; p99 <= 2 x echo p99: "
        f"{o['p99']:.3f} <= {2 * e['p99']:.3f} {'met' if o['p99'] <= 2 * e['p99'] else 'MISSED'}; "
        f"0 missed: {'met' if r['missed'] == 0 else 'MISSED'}"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--cadence", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--model", default="poyo-mp-small")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--realtime-priority", type=int, default=50,
                    help="the daemon's SCHED_FIFO priority (0: normal scheduling)")  # fmt: skip
    ap.add_argument("--compare", choices=sorted(COMPARE),
                    help="also run a daemon with this setting flipped, on the same stream")  # fmt: skip
    ap.add_argument("--pages", type=int, default=0,
                    help="monitoring pages (SSE clients) open during the replay")  # fmt: skip
    ap.add_argument("--prime-us", type=float,
                    help="the daemon's prime_us (default: the serve config's; 0: off)")  # fmt: skip
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    a = ap.parse_args()
    if a.plot_only:
        from benchmarks._plots import plot_only

        plot_only("e2e_latency", a.plot_only)
        return
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        r = run(a.units, a.cadence, a.seconds, a.model, Path(tmp), a.realtime_priority or None,
                a.compare, a.pages, a.prime_us)  # fmt: skip
    print(table(r))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(r, indent=1))
        print(f"wrote {a.json}")
        from benchmarks._plots import draw

        draw("e2e_latency", r, a.json)


if __name__ == "__main__":
    main()
