"""Label-free calibration of a held-out real session over REST, from the daemon's buffer.

Issue 9's acceptance on real data: a session the model never saw (default
spike_20120904_wf; ``models/poyo-mp-transfer-s2`` was pretrained without it) is replayed
in real time over LSL into ``bci-decoder serve`` (its own process, real HTTP, a
temporary copy of the model folder, **no behaviour stream configured**), then

1. once the buffer holds the first S s of the session's training part (the span
   ``benchmarks/unit_identification.py --label-free`` fits on), ``POST /calibrations
   {"source": "buffer", "mode": "unsupervised", "seconds": S}``; the job is polled to the
   end while the decoder keeps decoding the replay;
2. ``POST /calibrations/{id}/apply`` swaps the new tables in between two steps; the replay
   goes on for ``--after`` s;
3. missed deadlines are read from ``/status`` before the job, during it, around the swap
   and after it, and the decoded stream (``Control``, recorded here) gives the largest
   interval between outputs near the swap (1 / cadence = nothing skipped);
4. the stored calibration is loaded from the copy's ``calibrations/`` and scored offline
   (causal) on the session's last 30%, next to the offline label-free figure
   (``benchmarks/results/label_free_s2.json``) and zero-shot (``across_days_s2.json``).

    .venv/bin/python benchmarks/label_free_rest.py \
        --json benchmarks/results/label_free_rest.json | tee benchmarks/results/label_free_rest.txt
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bci_decoder.calibrate import decode_causal, score_span, session_tokens  # noqa: E402
from bci_decoder.config import StreamSettings  # noqa: E402
from bci_decoder.data.nwb import read_nwb  # noqa: E402
from bci_decoder.data.session import time_split  # noqa: E402
from bci_decoder.metrics import r2_score  # noqa: E402
from bci_decoder.model.decoder import Decoder  # noqa: E402
from bci_decoder.runtime.client import StreamRecorder  # noqa: E402
from bci_decoder.runtime.daemon import CALIBRATIONS  # noqa: E402
from bci_decoder.runtime.decode_loop import lsl_clock  # noqa: E402
from bci_decoder.runtime.processes import ProcessGroup, free_port, wait_http  # noqa: E402
from bci_decoder.runtime.replay import Replayer  # noqa: E402
from benchmarks._common import find_session_file, run_info, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def start_daemon(model: Path, out: Path, procs: ProcessGroup, output: str, cadence: float) -> dict:
    """``bci-decoder serve`` (the installed entry) on a copy of ``model``, no behaviour
    stream: calibrations land in ``out/models``."""
    models = out / "models"
    shutil.rmtree(models, ignore_errors=True)
    shutil.copytree(model, models / model.name, ignore=shutil.ignore_patterns(CALIBRATIONS))
    port, token = free_port(), secrets.token_urlsafe(16)
    tag = f"label-free-rest-{port}"
    cfg = {
        "model": model.name, "models_dir": str(models), "state_dir": str(out / "serve"),
        "output": output, "cadence_hz": cadence,
        "spikes": {"type": "Spikes", "source_id": tag}, "behavior": None,
        "control_source_id": f"{tag}-control",
        "api": {"host": "127.0.0.1", "port": port, "token": token},
    }  # fmt: skip
    (out / "serve.yaml").write_text(yaml.safe_dump(cfg))
    entry = Path(sys.executable).parent / "bci-decoder"
    procs.python("serve", [str(entry), "serve", "--config", str(out / "serve.yaml")])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", 120, lambda: procs.check("serve"))
    cfg["http"] = httpx.Client(base_url=url, timeout=60.0)
    cfg["auth"] = {"Authorization": f"Bearer {token}"}
    return cfg


def _status(http: httpx.Client) -> dict:
    r = http.get("/status")
    r.raise_for_status()
    return r.json()


def _pull(rec: StreamRecorder, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rec.pull(0.002)


def _counts(s: dict) -> dict:
    return {k: s[k] for k in ("steps", "missed_deadlines", "late_outputs", "errors",
                              "safe_steps", "swaps")}  # fmt: skip


def _diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def reference_figures(session_id: str) -> dict:
    """Offline label-free and zero-shot R² of the same session from the committed studies."""
    ref = {"offline_label_free": None, "zero_shot": None, "supervised_ui_60": None}
    path = RESULTS / "label_free_s2.json"
    if path.exists():
        for r in json.loads(path.read_text())["rows"]:
            if r["session"] == session_id and r.get("requested_seconds") == 60:
                ref["offline_label_free"] = r.get("free_r2")
                ref["supervised_ui_60"] = r.get("r2")
    path = RESULTS / "across_days_s2.json"
    if path.exists():
        for r in json.loads(path.read_text())["rows"]:
            if r["session"] == session_id:
                ref["zero_shot"] = r.get("zero_shot")
    return ref


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "poyo-mp-transfer-s2")
    ap.add_argument("--session", default="spike_20120904_wf")
    ap.add_argument("--seconds", type=float, default=60.0, help="buffer seconds calibrated on")
    ap.add_argument("--steps", type=int, default=150, help="label-free fit steps (as offline)")
    ap.add_argument("--after", type=float, default=30.0, help="replay seconds after the swap")
    ap.add_argument("--cadence", type=float, default=100.0)
    ap.add_argument("--job-timeout", type=float, default=1500.0)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "label-free-rest")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path, help="picture (default: next to --json)")
    a = ap.parse_args(argv)
    info = run_info()
    a.out.mkdir(parents=True, exist_ok=True)
    session = read_nwb(find_session_file(a.session))
    base = Decoder.load(a.model)
    if session.session_id in base.sessions:
        raise SystemExit(f"{session.session_id} was in {a.model.name}'s pretraining")
    output = session.default_output()
    split = time_split(session)
    start = split.fit[0]
    stop = min(session.domain[1], start + a.seconds + a.job_timeout + a.after + 30.0)
    period = 1.0 / a.cadence
    print(f"model {a.model.name}, session {session.session_id} ({session.num_units} units, "
          f"output {output}); load average {os.getloadavg()}", flush=True)  # fmt: skip

    procs = ProcessGroup(a.out / "logs")
    marks: dict[str, float] = {}  # LSL clock of each phase boundary
    status: dict[str, dict] = {}
    try:
        cfg = start_daemon(a.model, a.out, procs, output, a.cadence)
        http, auth = cfg["http"], cfg["auth"]
        r = http.post("/decoder/start", headers=auth)
        r.raise_for_status()
        rep = Replayer(session, start=start, stop=stop, source_id=cfg["spikes"]["source_id"],
                       behavior=False, wait_for_consumer_s=30)  # fmt: skip
        rep.start()
        deadline = time.time() + 60
        while _status(http)["state"] != "running":
            procs.check("serve")
            if time.time() > deadline:
                raise RuntimeError(f"daemon not running: {_status(http)['state']}")
            time.sleep(0.1)
        rec = StreamRecorder(StreamSettings(type="Control", source_id=cfg["control_source_id"]))
        span = stop - start
        print(f"replaying from {start:.1f} s; waiting for {a.seconds:g} s in the buffer",
              flush=True)  # fmt: skip
        shown = 0
        # 50 ms past S: the last spikes of the span have crossed LSL and the inlet
        while rep.progress * span < a.seconds + 0.05:
            rec.pull(0.005)
            if rep.progress * span >= shown + 10:
                shown += 10
                print(f"  replayed {shown} s", flush=True)
        st = _status(http)
        status["before"] = st
        marks["post"] = lsl_clock()
        body = {"source": "buffer", "mode": "unsupervised", "seconds": a.seconds,
                "steps": a.steps, "output": output, "name": f"free-{session.session_id}",
                "session": session.session_id}  # fmt: skip
        shutil.rmtree(a.out / "models" / a.model.name / CALIBRATIONS / body["name"],
                      ignore_errors=True)  # fmt: skip
        r = http.post("/calibrations", json=body, headers=auth)
        if r.status_code != 202:
            raise RuntimeError(f"POST /calibrations: {r.status_code} {r.text}")
        job = r.json()
        print(f"POST /calibrations: job {job['id']}, {job['units']} units, {job['spikes']} "
              f"spikes over {job['seconds']:.1f} s (no behaviour stream)", flush=True)  # fmt: skip
        t0, last = time.perf_counter(), -1.0
        while job["state"] in ("queued", "running"):
            _pull(rec, 0.5)
            procs.check("serve")
            job = http.get(f"/calibrations/{job['id']}").json()
            if job["progress"] - last >= 0.1 or job["state"] not in ("queued", "running"):
                last = job["progress"]
                loss = f", loss {job['loss']:.4f}" if job["loss"] is not None else ""
                print(f"  [{time.perf_counter() - t0:6.1f} s] {job['phase'] or job['state']}: "
                      f"{job['progress']:.0%}{loss}", flush=True)  # fmt: skip
            if time.perf_counter() - t0 > a.job_timeout:
                raise RuntimeError(f"job {job['id']} still {job['state']} after {a.job_timeout} s")
        if job["state"] != "done":
            raise RuntimeError(f"calibration {job['id']} {job['state']}: {job['error']}")
        client_wall = time.perf_counter() - t0
        status["job_done"] = _status(http)
        marks["apply"] = lsl_clock()
        r = http.post(f"/calibrations/{job['id']}/apply", headers=auth)
        marks["applied"] = lsl_clock()
        if r.status_code != 200:
            raise RuntimeError(f"apply: {r.status_code} {r.text}")
        print(f"applied in {(marks['applied'] - marks['apply']) * 1e3:.0f} ms (HTTP round trip)",
              flush=True)  # fmt: skip
        _pull(rec, 2.0)
        status["swap"] = _status(http)
        _pull(rec, max(a.after - 2.0, 0.0))
        status["after"] = _status(http)
        metrics_text = http.get("/metrics").text
        rep.stop()
        rep.join(10)
        procs.check("serve")
    finally:
        procs.stop_all()

    # ---- missed deadlines per phase (the daemon's own counts) and output intervals
    c = {k: _counts(v) for k, v in status.items()}
    phases = {
        "before_job": c["before"],  # start-up and the first S s
        "during_job": _diff(c["before"], c["job_done"]),
        "swap_2s": _diff(c["job_done"], c["swap"]),  # apply request + 2 s
        "after": _diff(c["swap"], c["after"]),
    }
    td, yd, _ = rec.arrays()
    gaps = np.diff(td)
    mid = td[:-1]

    def gap_stats(lo: float, hi: float) -> dict:
        g = gaps[(mid >= lo) & (mid < hi)]
        return {
            "outputs": int(len(g)), "max_interval_ms": float(g.max() * 1e3) if len(g) else None,
            "intervals_over_1.5_periods": int((g > 1.5 * period).sum()),
        }  # fmt: skip

    first = td[0] if len(td) else marks["post"]
    intervals = {
        "before_job": gap_stats(first, marks["post"]),
        "during_job": gap_stats(marks["post"], marks["apply"]),
        "swap_1s": gap_stats(marks["apply"] - 1.0, marks["applied"] + 1.0),
        "after": gap_stats(marks["applied"] + 1.0, np.inf),
    }
    log = rep.log
    to_s = log.to_session_time
    block = (float(to_s(marks["post"])) - a.seconds, float(to_s(marks["post"])))

    # ---- live R² of the decoded stream (short spans: indicative only)
    beh = session.behavior[output]
    ts = to_s(td)
    truth = np.stack([np.interp(ts, beh.timestamps, beh.data[:, i]) for i in range(beh.dim)], 1)

    def live_r2(lo: float, hi: float) -> float | None:
        m = (td >= lo) & (td < hi)
        return float(r2_score(truth[m], yd[m])) if m.sum() > 50 else None

    live = {
        "before_swap": live_r2(marks["post"], marks["apply"]),  # before calibration
        "after_swap": live_r2(marks["applied"] + 0.5, np.inf),  # the --after seconds
    }

    # ---- the stored calibration, scored offline on the last 30%
    stored_dir = a.out / "models" / a.model.name / CALIBRATIONS / job["calibration"]
    stored = Decoder.load(stored_dir)
    cal_info = stored.info.get("calibration", {})
    session.session_id = cal_info.get("session", session.session_id)
    rest_r2 = float(score_span(stored, session, output, split.test))
    # the live stream after the swap against the stored calibration decoded offline at the
    # same times: the daemon really decodes with what was stored (R² over a few seconds
    # is noisy, e.g. a span where y barely moves; agreement is not)
    after = td >= marks["applied"] + 0.5
    z = decode_causal(stored, *session_tokens(stored, session), output, ts[after])
    y_off = stored.norms[session.session_id][output].inverse(z)
    err = np.abs(yd[after] - y_off)
    parity = {
        "outputs": int(after.sum()),
        "max_abs_diff": float(err.max()), "median_abs_diff": float(np.median(err)),
        "behaviour_std": truth[after].std(0).tolist(),
        "r2_live": live["after_swap"], "r2_offline_same_times": float(r2_score(truth[after], y_off)),
        "r2_live_vs_offline": float(r2_score(y_off, yd[after])),
    }  # fmt: skip
    ref = reference_figures(a.session)
    final = status["after"]
    result = {
        **info,
        "model": str(a.model.relative_to(ROOT) if a.model.is_relative_to(ROOT) else a.model),
        "session": a.session, "output": output, "cadence_hz": a.cadence, "seconds": a.seconds,
        "steps": a.steps, "test_span": list(split.test),
        "block_session_time": block,
        "job": {k: job[k] for k in ("id", "name", "mode", "state", "units", "spikes", "seconds",
                                    "steps", "wall_s", "loss", "calibration", "output",
                                    "session")},
        "job_client_wall_s": client_wall,
        "warm_start": stored.info.get("warm_start"),
        "rest_r2": rest_r2, **ref,
        "rest_minus_offline": None if ref["offline_label_free"] is None
        else rest_r2 - ref["offline_label_free"],
        "missed_deadlines": phases,
        "output_intervals": intervals,
        "apply_http_ms": (marks["applied"] - marks["apply"]) * 1e3,
        "live_r2": live,
        "after_swap_live_vs_offline": parity,
        "final_state": final["state"], "final_model": final["model"]["calibration"],
        "calibrated": final["model"]["calibrated"],
        "dropped": final["dropped"], "latency": final["latency"],
        "load_average_end": list(os.getloadavg()),
        "metrics_missed": [ln for ln in metrics_text.splitlines()
                           if ln.startswith(("bci_missed", "bci_steps_total"))],
    }  # fmt: skip
    _table(result)
    if a.json:
        write_json(a.json, result)
        _plot(
            td,
            gaps,
            yd,
            truth,
            (after, y_off),
            marks,
            period,
            result,
            a.png or a.json.with_suffix(".png"),
        )
    return result


def _fmt(x: float | None, f: str = ".3f") -> str:
    return "n/a" if x is None else format(x, f)


def _table(r: dict) -> None:
    j = r["job"]
    print(f"\n{r['session']}: label-free calibration over REST from the buffer "
          f"({j['seconds']:.1f} s, {j['spikes']} spikes, {j['units']} units; session time "
          f"{r['block_session_time'][0]:.2f}-{r['block_session_time'][1]:.2f} s), "
          f"{r['steps']} steps")  # fmt: skip
    print(f"R² on the last 30% (causal, {r['output']}):")
    print(f"  REST calibration (stored, scored offline)  {_fmt(r['rest_r2'], '.4f')}")
    print(
        f"  offline label-free, same 60 s              {_fmt(r['offline_label_free'], '.4f')}"
        f"   (label_free_s2.json; diff {_fmt(r['rest_minus_offline'], '+.4f')})"
    )
    print(f"  zero-shot                                  {_fmt(r['zero_shot'], '.4f')}")
    print(f"  supervised unit identification, 60 s       {_fmt(r['supervised_ui_60'], '.4f')}")
    print(f"job wall time {j['wall_s']:.1f} s (daemon), {r['job_client_wall_s']:.1f} s "
          f"(POST to done, client); apply {r['apply_http_ms']:.0f} ms")  # fmt: skip
    head = f"{'phase':14s}{'steps':>8s}{'missed':>8s}{'late':>6s}{'errors':>8s}{'swaps':>7s}"
    head += f"{'max interval ms':>17s}{'> 1.5 periods':>15s}"
    print(f"\n{head}\n{'-' * len(head)}")
    for (name, m), iv in zip(r["missed_deadlines"].items(), r["output_intervals"].values(),
                             strict=True):  # fmt: skip
        print(f"{name:14s}{m['steps']:8d}{m['missed_deadlines']:8d}{m['late_outputs']:6d}"
              f"{m['errors']:8d}{m['swaps']:7d}{_fmt(iv['max_interval_ms'], '.1f'):>17s}"
              f"{iv['intervals_over_1.5_periods']:15d}")  # fmt: skip
    print(
        f"(interval windows: swap = apply request - 1 s to reply + 1 s; "
        f"missed: swap = apply request + 2 s; 1 period = {1e3 / r['cadence_hz']:.0f} ms)"
    )
    lv = r["live_r2"]
    print(
        f"live decoded stream R² (short spans, indicative): during the job (uncalibrated) "
        f"{_fmt(lv['before_swap'])}, after the swap {_fmt(lv['after_swap'])}"
    )
    p = r["after_swap_live_vs_offline"]
    print(
        f"after the swap ({p['outputs']} outputs): live R² {_fmt(p['r2_live'])} vs the stored "
        f"calibration decoded offline at the same times {_fmt(p['r2_offline_same_times'])} "
        f"(behaviour std {np.round(p['behaviour_std'], 2).tolist()}); live vs offline: R² "
        f"{p['r2_live_vs_offline']:.4f}, |diff| median {p['median_abs_diff']:.3g}, max "
        f"{p['max_abs_diff']:.3g}"
    )
    print(
        f"final state {r['final_state']}, calibration {r['final_model']}, "
        f"lsl gaps {r['dropped']['lsl_gaps']}, ring overflow {r['dropped']['ring_overflow']}"
    )
    print(f"load average: start {r['load_average']}, end {r['load_average_end']}")


def _plot(td, gaps, yd, truth, offline, marks, period, r, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = marks["apply"]
    rel = td - t0
    win = rel > -10  # the end of the job, the swap and after
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    ax0.plot(rel[:-1][win[:-1]], gaps[win[:-1]] * 1e3, ".", ms=2)
    ax0.axhline(period * 1e3, color="grey", lw=0.8, ls=":", label="1 / cadence")
    ax0.set_ylim(0, max(3 * period, gaps[win[:-1]].max() * 1.15) * 1e3)
    ax0.ticklabel_format(axis="y", useOffset=False)
    ax0.axvline(0, color="tab:red", lw=1, label="apply (swap)")
    ax0.set_ylabel("interval between outputs (ms)")
    ax0.set_title(f"{r['session']}: label-free REST calibration applied while decoding "
                  f"({r['cadence_hz']:g} Hz); R² {r['rest_r2']:.3f} on the last 30%",
                  fontsize=9)  # fmt: skip
    ax0.legend(fontsize=8)
    ax1.plot(rel[win], truth[win, 0], color="k", lw=1, label=f"true {r['output']} x")
    ax1.plot(rel[win], yd[win, 0], color="tab:blue", lw=1, label="decoded x (live)")
    after, y_off = offline
    ax1.plot(rel[after], y_off[:, 0], color="tab:orange", lw=0.8, ls="--",
             label="stored calibration, offline")  # fmt: skip
    ax1.axvline(0, color="tab:red", lw=1)
    ax1.set_xlabel("s from the apply request")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
