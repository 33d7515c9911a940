"""Load and soak: the daemon under 2,000 units at 50 Hz (100k spikes/s) at 100 Hz cadence.

Three processes, as on a rig: the daemon (``bci-decoder serve`` with the shipped
``configs/serve.yaml``, pinned to this run's streams), a spike source
(``runtime/spike_source.py``: Poisson spikes, 5 ms chunks, a ``seq`` channel) and this
script, which polls ``/status`` and the daemon's RSS once a second. Stream unit k carries
the label of the shipped model's unit ``k mod 156`` of session sim7_s0, so every spike is
decodable and reaches the engine (its group buffer, serve config ``max_spikes_per_group``,
holds 16,384 spikes per 50 ms latent step, about 330k spikes/s; what does not fit, or
arrives after its group was finished, is counted as ``engine_overflow`` / ``engine_late``,
never silently).

After ``--warmup-s`` (the 4M-spike ring fills in 40 s at this rate; its pages count in
RSS until it wraps) two windows are measured from the same run:
- load: the first ``--load-s`` (issue 11: under 0.1% missed deadlines, 0 sequence gaps);
- soak: the first ``--soak-s`` (RSS growth under 5 MB after warm-up).

    .venv/bin/python benchmarks/load_soak.py --json benchmarks/results/load_soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import yaml
from _common import ROOT, run_info, write_json

from bci_decoder.runtime.processes import free_port, wait_http

SESSION = "sim7_s0"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def daemon_config(tmp: Path, model: str, cadence: float, tag: str, port: int) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    cfg |= {
        "model": model,
        "models_dir": str(ROOT / "models"),
        "state_dir": str(tmp / "serve"),
        "cadence_hz": cadence,
        "spikes": {"type": "Spikes", "source_id": f"load-{tag}"},
        "behavior": None,
        "control_source_id": f"load-control-{tag}",
        "autostart": True,
        "api": {"host": "127.0.0.1", "port": port, "token": f"load-soak-{tag}"},
    }
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def window(samples: list[dict], start: float, span: float) -> dict:
    """What changed between the sample at ``start`` and the one ``span`` s later."""
    t = np.array([s["t"] for s in samples])
    i0 = int(np.searchsorted(t, start))
    i1 = int(np.searchsorted(t, start + span, side="right")) - 1
    a, b = samples[i0], samples[i1]
    st_a, st_b = a["status"], b["status"]
    steps = st_b["steps"] - st_a["steps"]
    missed = st_b["missed_deadlines"] - st_a["missed_deadlines"]
    dropped = {k: st_b["dropped"][k] - st_a["dropped"].get(k, 0) for k in st_b["dropped"]}
    rss = np.array([s["rss_mb"] for s in samples[i0 : i1 + 1]])
    ts = t[i0 : i1 + 1] - t[i0]
    slope = float(np.polyfit(ts, rss, 1)[0] * 60) if len(ts) > 2 else float("nan")
    received = st_b["stream"]["received"] - st_a["stream"]["received"]
    return {
        "seconds": float(b["t"] - a["t"]),
        "steps": steps,
        "missed": missed,
        "missed_percent": 100.0 * missed / max(steps + missed, 1),
        "late": st_b["late_outputs"] - st_a["late_outputs"],
        "errors": st_b["errors"] - st_a["errors"],
        "spikes_received": received,
        "spikes_per_s": received / max(b["t"] - a["t"], 1e-9),
        "spikes_decoded": st_b["engine"]["spikes"] - st_a["engine"]["spikes"],
        "dropped": {k: v for k, v in dropped.items() if v},
        "sequence_gaps": dropped["lsl_gaps"],
        "rss_start_mb": float(rss[0]),
        "rss_end_mb": float(rss[-1]),
        "rss_growth_mb": float(rss[-1] - rss[0]),
        "rss_max_growth_mb": float(rss.max() - rss[0]),
        "rss_slope_mb_per_min": slope,
        "daemon_cpu_percent": 100.0 * (b["cpu_s"] - a["cpu_s"]) / max(b["t"] - a["t"], 1e-9),
        "load_average": [a["load"], b["load"]],
        "output_ms_at_end": st_b["latency"]["output_ms"],
    }


def run(a: argparse.Namespace) -> dict:
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="load-soak-"))
    meta = json.loads((ROOT / "models" / a.model / "meta.json").read_text())
    labels = [u.split("/", 1)[1] for u in meta["units"] if u.startswith(f"{SESSION}/")]
    (tmp / "units.txt").write_text("\n".join(labels))
    cfg_path = daemon_config(tmp, a.model, a.cadence, tag, port)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = (tmp / "serve.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "bci_decoder.cli", "serve", "--config", str(cfg_path)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    total = a.warmup_s + max(a.load_s, a.soak_s)
    source = None
    samples: list[dict] = []
    try:
        wait_http(url + "/health", 180)
        source = subprocess.Popen(
            [sys.executable, "-m", "bci_decoder.runtime.spike_source", "--source-id",
             f"load-{tag}", "--labels", str(tmp / "units.txt"), "--session", SESSION,
             "--units", str(a.units), "--rate-hz", str(a.rate_hz), "--seconds",
             str(total + 10), "--chunk-ms", str(a.chunk_ms), "--wait-s", "60"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )  # fmt: skip
        http = httpx.Client(base_url=url, timeout=10.0)
        deadline = time.monotonic() + 60
        while http.get("/status").json()["state"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon never decoded the source")
            time.sleep(0.2)
        t0 = time.monotonic()
        k = 0
        while True:
            k += 1
            time.sleep(max(0.0, t0 + k - time.monotonic()))
            st = http.get("/status").json()
            now = time.monotonic() - t0
            samples.append({"t": now, "status": st, "rss_mb": rss_mb(daemon.pid),
                            "cpu_s": cpu_s(daemon.pid), "load": os.getloadavg()[0]})  # fmt: skip
            if k % 30 == 0:
                print(f"{now:6.0f} s: {st['state']}, steps {st['steps']}, missed "
                      f"{st['missed_deadlines']}, RSS {samples[-1]['rss_mb']:.1f} MB, "
                      f"load {samples[-1]['load']:.1f}", flush=True)  # fmt: skip
            if now >= total:
                break
        final = samples[-1]["status"]
    finally:
        if source is not None and source.poll() is None:
            source.send_signal(signal.SIGTERM)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
    src_out = source.communicate(timeout=30)[0] if source is not None else ""
    sent = json.loads(src_out.strip().splitlines()[-1]) if src_out.strip() else {}
    return {
        "settings": vars(a) | {"json": str(a.json) if a.json else None},
        "source": sent,
        "realtime": final["realtime"],
        "load": window(samples, a.warmup_s, a.load_s),
        "soak": window(samples, a.warmup_s, a.soak_s),
        "whole_run": window(samples, 0.0, total),
        "timeline": [
            {
                "t": round(s["t"], 2),
                "rss_mb": round(s["rss_mb"], 2),
                "load": s["load"],
                "steps": s["status"]["steps"],
                "missed": s["status"]["missed_deadlines"],
                "received": s["status"]["stream"]["received"],
                "state": s["status"]["state"],
            }
            for s in samples
        ],  # fmt: skip
    }


def table(res: dict) -> str:
    rows = [f"{'window':<10} {'s':>5} {'steps':>7} {'missed':>6} {'missed %':>8} {'gaps':>5} "
            f"{'spikes/s':>9} {'decoded':>9} {'RSS +MB':>8} {'MB/min':>7} {'CPU %':>6} "
            f"{'load':>10}"]  # fmt: skip
    for name in ("load", "soak", "whole_run"):
        w = res[name]
        rows.append(
            f"{name:<10} {w['seconds']:>5.0f} {w['steps']:>7} {w['missed']:>6} "
            f"{w['missed_percent']:>8.3f} {w['sequence_gaps']:>5} {w['spikes_per_s']:>9.0f} "
            f"{w['spikes_decoded']:>9} {w['rss_growth_mb']:>8.2f} "
            f"{w['rss_slope_mb_per_min']:>7.3f} {w['daemon_cpu_percent']:>6.0f} "
            f"{w['load_average'][0]:>4.1f}-{w['load_average'][1]:<4.1f}"
        )
    for name in ("load", "soak"):
        rows.append(f"{name} dropped: {res[name]['dropped']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="poyo-mp-small")
    ap.add_argument("--units", type=int, default=2000)
    ap.add_argument("--rate-hz", type=float, default=50.0, help="per unit")
    ap.add_argument("--cadence", type=float, default=100.0)
    ap.add_argument("--chunk-ms", type=float, default=5.0, help="the source's push period")
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--load-s", type=float, default=120.0)
    ap.add_argument("--soak-s", type=float, default=600.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    a = ap.parse_args(argv)
    if a.plot_only:
        from _plots import plot_only

        return plot_only("load_soak", a.plot_only)
    info = run_info()
    res = run(a)
    res["info"] = info | {"load_average_end": list(os.getloadavg())}
    res["verdict"] = {
        "missed_under_0.1_percent": res["load"]["missed_percent"] < 0.1,
        "no_sequence_gaps": res["load"]["sequence_gaps"] == 0,
        "rss_growth_under_5_mb": res["soak"]["rss_growth_mb"] < 5.0,
    }
    print(table(res))
    print(json.dumps(res["verdict"]))
    write_json(a.json, res)
    from _plots import draw

    draw("load_soak", res, a.json)
    return res


if __name__ == "__main__":
    main()
