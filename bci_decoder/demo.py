"""The main job (``make demo``): the whole product live on loopback, then a report.

1. starts the daemon (``bci-decoder serve``) with the shipped model,
2. replays a session into LSL (``bci-decoder replay``): by default a *new* simulated
   session the model has never seen, or ``--data FILE.nwb``,
3. records the decoded and the behaviour streams in a separate client process,
4. after ``--calibrate-after`` seconds calibrates over REST on the buffer's last seconds
   (behaviour from the replayed behaviour stream), applies it between two steps, and
5. keeps decoding for ``--after`` seconds, then prints R² before and after calibration,
   latency percentiles, missed deadlines and dropped samples, and writes a PNG.
Every process it started is stopped when it ends, whatever happens.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from bci_decoder.metrics import r2_score
from bci_decoder.runtime.decode_loop import lsl_clock
from bci_decoder.runtime.processes import ProcessGroup, free_port, wait_http


def align(
    td: np.ndarray, yd: np.ndarray, tb: np.ndarray, hop: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each behaviour time, the newest decoded value at or before it (NaN if none
    within two hops): what a rig acting on the decoded stream had at that moment."""
    i = np.searchsorted(td, tb, side="right") - 1
    ok = (i >= 0) & (tb - td[np.clip(i, 0, None)] <= 2 * hop)
    out = np.full((len(tb), yd.shape[1]), np.nan)
    out[ok] = yd[i[ok]]
    return out, ok


def _r2(mask: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> float | None:
    m = mask & np.isfinite(pred).all(1)
    return r2_score(truth[m], pred[m]) if m.sum() > 20 else None


def _pct(x: np.ndarray) -> dict[str, float | None]:
    if not len(x):
        return {"p50": None, "p99": None, "p999": None}
    p = np.percentile(x, [50, 99, 99.9])
    return {"p50": float(p[0]), "p99": float(p[1]), "p999": float(p[2])}


def run_demo(
    model: str = "poyo-mp-small",
    models_dir: Path = Path("models"),
    data: Path | None = None,
    out: Path = Path("out/demo"),
    calibrate_after: float = 30.0,
    after: float = 40.0,
    cadence_hz: float = 100.0,
    steps: int = 150,
    sim_units: int | None = None,
    realtime_priority: int | None = 50,
) -> dict[str, Any]:
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    port, token = free_port(), secrets.token_urlsafe(16)
    spikes_id, control_id = f"demo-{tag}", f"demo-{tag}-control"
    cfg = {
        "model": model, "models_dir": str(models_dir), "cadence_hz": cadence_hz,
        "state_dir": str(out / "serve"),
        "spikes": {"type": "Spikes", "source_id": spikes_id},
        "behavior": {"type": "Behavior", "source_id": f"{spikes_id}-behavior"},
        "control_source_id": control_id, "realtime_priority": realtime_priority,
        "api": {"host": "127.0.0.1", "port": port, "token": token},
        # everything in and out, to HDF5 (bci-decoder recording FILE [--nwb OUT])
        "recording": {"path": str(out / "recording.h5")},
    }  # fmt: skip
    (out / "serve.yaml").write_text(yaml.safe_dump(cfg))
    procs = ProcessGroup(out / "logs")
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    http = httpx.Client(base_url=url, timeout=30.0)
    try:
        print(f"[demo] starting the daemon ({model}, {cadence_hz:g} Hz) on {url}")
        procs.python(
            "serve", ["-m", "bci_decoder.cli", "serve", "--config", str(out / "serve.yaml")]
        )
        wait_http(url + "/health", 120, lambda: procs.check("serve"))
        http.post("/decoder/start", headers=auth).raise_for_status()
        total = calibrate_after + 180.0 + after  # room for a slow calibration; stopped early
        if data is None:
            replay_args = ["--simulate", "--seed", "7", "--index", "3"]
            if sim_units:
                replay_args += ["--units", str(sim_units)]
            what = "a new simulated session (sim7_s3, unknown to the model)"
        else:
            replay_args = [str(data), "--start", "0.7"]
            what = f"{data.name} from 70% (its held-out part)"
        procs.python("replay", ["-m", "bci_decoder.cli", "replay", *replay_args, "--seconds",
                                str(total), "--source-id", spikes_id, "--name", "demo"])  # fmt: skip
        procs.python("client", ["-m", "bci_decoder.runtime.client",
                                "--stream", f"decoded=Control:{control_id}",
                                "--stream", f"behavior=Behavior:{spikes_id}-behavior",
                                "--seconds", str(total + 60), "--out", str(out / "client.npz")])  # fmt: skip
        print(f"[demo] replaying {what}; the client records the decoded stream")
        st = _wait_running(http, procs, 60)
        t_running = lsl_clock()
        print(f"[demo] decoding: session {st['model']['session']}, calibrated: "
              f"{st['model']['calibrated']}; calibrating in {calibrate_after:g} s")  # fmt: skip
        _sleep_checking(calibrate_after, procs)
        before = http.get("/status").json()
        t_cal = lsl_clock()
        r = http.post("/calibrations", headers=auth, json={
            "source": "buffer", "seconds": calibrate_after, "steps": steps})  # fmt: skip
        if r.status_code != 202:
            raise RuntimeError(f"POST /calibrations answered {r.status_code}: {r.text}")
        job = r.json()
        print(f"[demo] calibration {job['id']} on {job['seconds']:.0f} s "
              f"({job['units']} units, {job['spikes']} spikes) running in its own process")  # fmt: skip
        while job["state"] in ("queued", "running"):
            time.sleep(1.0)
            procs.check("serve")
            job = http.get(f"/calibrations/{job['id']}").json()
            if sys.stdout.isatty():
                print(f"\r[demo]   {job['phase'] or 'starting'}: {100 * job['progress']:.0f}% "
                      f"loss {job['loss'] or float('nan'):.3f}   ", end="", flush=True)  # fmt: skip
        if sys.stdout.isatty():
            print()
        if job["state"] != "done":
            raise RuntimeError(f"calibration {job['state']}: {job['error']}")
        during = http.get("/status").json()
        job = http.post(f"/calibrations/{job['id']}/apply", headers=auth).json()
        t_apply = lsl_clock()
        print(f"[demo] applied '{job['calibration']}' (held-out R² {job['heldout_r2']:.3f}, "
              f"Wiener on the same data {job['wiener_r2']:.3f}); decoding {after:g} s more")  # fmt: skip
        _sleep_checking(after, procs)
        final = http.get("/status").json()
        http.post("/decoder/stop", headers=auth)
        procs.stop("replay")
        procs.stop("client", grace=10.0)  # SIGTERM: it saves what it recorded
    finally:
        http.close()
        procs.stop_all()

    rec = np.load(out / "client.npz")
    td, yd, ad = rec["decoded_timestamps"], rec["decoded_values"], rec["decoded_arrival"]
    tb, xb = rec["behavior_timestamps"], rec["behavior_values"]
    hop = 1.0 / cadence_hz
    pred, _ = align(td, yd, tb, hop)
    pre = (tb > t_running + 2.0) & (tb < t_cal)
    post = tb > t_apply + 0.5
    lat = (ad - td) * 1e3
    during_m = (td > t_cal) & (td < t_apply)
    report = {
        "session": job["session"],
        "calibration": job["calibration"],
        "calibration_wall_s": job["wall_s"],
        "heldout_r2": job["heldout_r2"],
        "wiener_r2_same_data": job["wiener_r2"],
        "r2_before": _r2(pre, xb, pred),
        "r2_after": _r2(post, xb, pred),
        "seconds_after": float(tb[post][-1] - tb[post][0]) if post.any() else 0.0,
        "output_latency_ms": _pct(lat),
        "output_latency_before_ms": _pct(lat[td < t_cal]),
        "output_latency_during_calibration_ms": _pct(lat[during_m]),
        "steps": final["steps"],
        "missed_deadlines": final["missed_deadlines"],
        "missed_before_calibration": before["missed_deadlines"] - st["missed_deadlines"],
        "steps_before_calibration": before["steps"] - st["steps"],
        "missed_during_calibration": during["missed_deadlines"] - before["missed_deadlines"],
        "steps_during_calibration": during["steps"] - before["steps"],
        "dropped": final["dropped"],
        "max_gap_ms": float(np.diff(td).max() * 1e3) if len(td) > 1 else None,
        "gap_at_swap_ms": _gap_near(td, t_apply),
        "cadence_hz": cadence_hz,
        "realtime": final.get("realtime"),
        "wall_s": time.time() - t_start,
    }
    _plot(out / "demo.png", td, yd, tb, xb, lat, t_cal, t_apply, report)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _print_summary(report, out)
    return report


def _gap_near(td: np.ndarray, t: float) -> float | None:
    near = np.abs(td[:-1] - t) < 1.0
    return float(np.diff(td)[near].max() * 1e3) if near.any() else None


def _wait_running(http: httpx.Client, procs: ProcessGroup, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check("serve")
        procs.check("replay")
        st = http.get("/status").json()
        if st["state"] == "running":
            return st
        time.sleep(0.2)
    raise TimeoutError(f"the daemon did not start decoding within {timeout} s: {st['state']}")


def _sleep_checking(seconds: float, procs: ProcessGroup) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name in ("serve", "replay", "client"):
            procs.check(name)
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))


def _print_summary(r: dict, out: Path) -> None:
    def f(x: float | None, fmt: str = ".3f") -> str:
        return "n/a" if x is None else format(x, fmt)

    lat, lb, ld = (
        r["output_latency_ms"],
        r["output_latency_before_ms"],
        r["output_latency_during_calibration_ms"],
    )
    lines = [
        "",
        f"bci_decoder demo: {r['session']} at {r['cadence_hz']:g} Hz",
        f"  R² before calibration (unknown units)  {f(r['r2_before'])}",
        f"  R² after calibration ({r['seconds_after']:.0f} s decoded)     {f(r['r2_after'])}"
        f"   (held-out on the calibration block {f(r['heldout_r2'])}, Wiener {f(r['wiener_r2_same_data'])})",
        f"  calibration wall time                  {f(r['calibration_wall_s'], '.1f')} s",
        f"  output latency p50/p99/p99.9           {f(lat['p50'], '.2f')} / {f(lat['p99'], '.2f')} / {f(lat['p999'], '.2f')} ms",
        f"    before / during calibration p99      {f(lb['p99'], '.2f')} / {f(ld['p99'], '.2f')} ms",
        f"  steps / missed deadlines               {r['steps']} / {r['missed_deadlines']} "
        f"({r['missed_during_calibration']} during calibration)",
        f"  largest gap at the swap                {f(r['gap_at_swap_ms'], '.1f')} ms",
        f"  dropped samples                        {sum(r['dropped'].values())} {r['dropped']}",
        f"  scheduling (decode loop, spike inlet)  {_scheduling(r.get('realtime'))}",
        f"  report: {out / 'report.json'}, plot: {out / 'demo.png'} ({r['wall_s']:.0f} s)",
    ]  # fmt: skip
    print("\n".join(lines))
    sys.stdout.flush()


def _scheduling(rt: dict | None) -> str:
    """'SCHED_FIFO 50', 'normal', or the reason real-time priority was refused."""
    if not rt or not rt.get("threads"):
        return "n/a"
    return ", ".join(sorted(set(rt["threads"].values())))


def _plot(path: Path, td, yd, tb, xb, lat, t_cal, t_apply, r) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = td[0] if len(td) else 0.0
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [2, 2, 1.4]})
    for d, ax in enumerate(axes[:2]):
        ax.plot(tb - t0, xb[:, d], color="0.3", lw=1.0, label="true")
        ax.plot(td - t0, yd[:, d], color="tab:orange", lw=0.8, label="decoded (live)")
        ax.axvspan(t_cal - t0, t_apply - t0, color="tab:blue", alpha=0.12, label="calibrating")
        ax.axvline(t_apply - t0, color="tab:blue", lw=1.2)
        ax.set_ylabel(f"dim {d}")
        ax.set_xlim(max(0, t_cal - t0 - 20), td[-1] - t0 if len(td) else 1)
    axes[0].legend(loc="upper right", fontsize=8, ncol=3)
    axes[0].set_title(
        f"{r['session']}: R² before {r['r2_before'] or float('nan'):.2f}, "
        f"after calibration {r['r2_after'] or float('nan'):.2f}"
    )
    axes[1].set_xlabel("time since decoding started (s)")
    ax = axes[2]
    ax.hist(np.clip(lat, 0, 20), bins=200, color="tab:green")
    ax.set_yscale("log")
    p = r["output_latency_ms"]
    ax.set_xlabel(
        f"output latency local_clock() - timestamp (ms): p50 {p['p50']:.2f}, p99 {p['p99']:.2f}, "
        f"p99.9 {p['p999']:.2f}; missed deadlines {r['missed_deadlines']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
