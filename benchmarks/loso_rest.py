"""Leave-one-session-out through the REST path, checked against the offline command.

For each session the model never saw (``models/poyo-mp-small-loso3`` was pretrained
without chewie_20131003, mihi_20140303 and jango_20160711):

1. the first S seconds of the session's training part (first 70%) are written to an NWB
   file and uploaded to a running daemon (``bci-decoder serve``, real HTTP):
   ``POST /calibrations {"source": "upload", "nwb_base64": ...}``; the job is polled until
   it is done and stored as ``models/NAME/calibrations/CAL``;
2. the stored calibration is loaded from disk and scored offline (causal mode) on the
   session's last 30%;
3. the offline command ``bci-decoder calibrate --data FILE --seconds S`` runs on the same
   file and reports its R² next to Wiener and GRU fitted on the same S seconds and on the
   full 70%.

Goal (issue 5): the REST figure equals the offline one within 0.01 on at least 3 sessions.
The REST job trains on one torch thread in its own process; the offline command on
torch's default threads, so the two differ only by floating-point summation order.

    .venv/bin/python benchmarks/loso_rest.py --json benchmarks/results/loso_rest.json \
        | tee benchmarks/results/loso_rest.txt
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bci_decoder.calibrate import score_span  # noqa: E402
from bci_decoder.data.nwb import read_nwb, write_nwb  # noqa: E402
from bci_decoder.data.session import time_split  # noqa: E402
from bci_decoder.runtime.daemon import CALIBRATIONS  # noqa: E402
from bci_decoder.runtime.processes import ProcessGroup, free_port, wait_http  # noqa: E402
from bci_decoder.train.checkpoint import Decoder  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "real"
SESSIONS = ["chewie_20131003", "mihi_20140303", "jango_20160711"]
COLUMNS = ["rest", "offline", "wiener_same_seconds", "gru_same_seconds", "wiener_full",
           "gru_full"]  # fmt: skip


def start_daemon(model: Path, out: Path, procs: ProcessGroup) -> tuple[httpx.Client, dict]:
    """``bci-decoder serve`` on a copy of ``model`` (calibrations land in ``out``)."""
    models = out / "models"
    shutil.rmtree(models, ignore_errors=True)
    shutil.copytree(model, models / model.name, ignore=shutil.ignore_patterns(CALIBRATIONS))
    port, token = free_port(), secrets.token_urlsafe(16)
    cfg = {
        "model": model.name, "models_dir": str(models), "state_dir": str(out / "serve"),
        "spikes": {"type": "Spikes", "source_id": f"loso-rest-{port}"}, "behavior": None,
        "api": {"host": "127.0.0.1", "port": port, "token": token},
    }  # fmt: skip
    (out / "serve.yaml").write_text(yaml.safe_dump(cfg))
    procs.python("serve", ["-m", "bci_decoder.cli", "serve", "--config", str(out / "serve.yaml")])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", 120, lambda: procs.check("serve"))
    return httpx.Client(base_url=url, timeout=120.0), {"Authorization": f"Bearer {token}"}


def calibrate_over_rest(
    http: httpx.Client, auth: dict, nwb: Path, seconds: float, name: str, procs: ProcessGroup
) -> dict:
    body = {
        "source": "upload", "nwb_base64": base64.b64encode(nwb.read_bytes()).decode(),
        "seconds": seconds, "name": name, "session": name,
    }  # fmt: skip
    t0 = time.perf_counter()
    r = http.post("/calibrations", json=body, headers=auth)
    if r.status_code != 202:
        raise RuntimeError(f"POST /calibrations: {r.status_code} {r.text}")
    job = r.json()
    last = -1.0
    while job["state"] in ("queued", "running"):
        time.sleep(0.5)
        procs.check("serve")
        job = http.get(f"/calibrations/{job['id']}").json()
        if job["progress"] - last >= 0.1:
            last = job["progress"]
            print(f"  [rest] {job['phase'] or job['state']}: {job['progress']:.0%}", flush=True)
    if job["state"] != "done":
        raise RuntimeError(f"calibration {job['id']} {job['state']}: {job['error']}")
    job["client_wall_s"] = time.perf_counter() - t0
    return job


def offline_calibrate(model: Path, nwb: Path, seconds: float, out: Path) -> dict:
    """The ``bci-decoder calibrate`` command, as a lab would run it."""
    report = out / "offline.json"
    procs = ProcessGroup(out / "logs")
    procs.python("calibrate", ["-m", "bci_decoder.cli", "calibrate", "--model", str(model),
                               "--data", str(nwb), "--seconds", str(seconds),
                               "--json", str(report)])  # fmt: skip
    code = procs.wait("calibrate", 3600)
    if code != 0:
        tail = (out / "logs" / "calibrate.log").read_text()[-2000:]
        raise RuntimeError(f"bci-decoder calibrate failed ({code}):\n{tail}")
    return json.loads(report.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "poyo-mp-small-loso3")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sessions", nargs="+", default=SESSIONS)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "loso-rest")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="bar chart (default: next to --json)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    base = Decoder.load(a.model)
    print(f"model {a.model.name}; load average at start {os.getloadavg()}")
    procs = ProcessGroup(a.out / "logs")
    rows = []
    try:
        http, auth = start_daemon(a.model, a.out, procs)
        for sid in a.sessions:
            files = sorted(a.data.glob(f"{sid}*.nwb"))
            if not files:
                raise SystemExit(f"no NWB file for {sid} in {a.data}")
            if sid in base.sessions:
                raise SystemExit(f"{sid} was in {a.model.name}'s pretraining: not held out")
            session = read_nwb(files[0])
            split = time_split(session)
            start = split.fit[0]
            stop = min(start + a.seconds, split.fit[1])
            work = Path(tempfile.mkdtemp(prefix=f"{sid}-", dir=a.out))
            block = work / f"{sid}_first{a.seconds:g}s.nwb"
            write_nwb(session.slice(start, stop), block)
            name = f"loso-{sid}-{int(time.time())}"
            print(f"{sid}: uploading the first {stop - start:.0f} s "
                  f"({block.stat().st_size / 2**20:.1f} MB NWB)", flush=True)  # fmt: skip
            job = calibrate_over_rest(http, auth, block, a.seconds, name, procs)
            stored = Decoder.load(a.out / "models" / a.model.name / CALIBRATIONS / name)
            session.session_id = name  # the stored calibration knows the session by this id
            output = job["output"]
            rest = score_span(stored, session, output, split.test)
            print(f"  [offline] bci-decoder calibrate --data {files[0].name} ...", flush=True)
            off = offline_calibrate(a.model, files[0], a.seconds, work)
            row = {
                "session": sid, "output": output, "seconds": stop - start,
                "rest": rest, "offline": off["r2"], "diff": rest - off["r2"],
                "wiener_same_seconds": off["wiener_same_seconds"],
                "gru_same_seconds": off["gru_same_seconds"],
                "wiener_full": off["wiener_full"], "gru_full": off["gru_full"],
                "rest_heldout_r2": job["heldout_r2"], "rest_wiener_heldout_r2": job["wiener_r2"],
                "rest_wall_s": job["wall_s"], "offline_fit_wall_s": off["wall_s"],
                "calibration": name,
            }  # fmt: skip
            rows.append(row)
            print(f"  REST {rest:.4f}  offline {off['r2']:.4f}  diff {rest - off['r2']:+.4f}",
                  flush=True)  # fmt: skip
    finally:
        procs.stop_all()
    _table(rows, a.seconds)
    result = {
        "model": a.model.name, "seconds": a.seconds, "rows": rows,
        "max_abs_diff": max(abs(r["diff"]) for r in rows),
        "within_0.01": sum(abs(r["diff"]) <= 0.01 for r in rows),
    }  # fmt: skip
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
        _plot(rows, a.seconds, a.plot or a.json.with_suffix(".png"))


def _table(rows: list[dict], seconds: float) -> None:
    print(f"\nR² on the last 30% (causal); calibration on the first {seconds:g} s")
    head = f"{'session':18s}" + "".join(f"{c:>20s}" for c in [*COLUMNS, "diff"])
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['session']:18s}" + "".join(f"{r[c]:20.4f}" for c in [*COLUMNS, "diff"]))
    n = len(rows)
    print(f"{'mean':18s}" + "".join(f"{sum(r[c] for r in rows) / n:20.4f}" for c in COLUMNS))
    print(f"\nREST vs offline: max |diff| {max(abs(r['diff']) for r in rows):.4f}; "
          f"within 0.01 on {sum(abs(r['diff']) <= 0.01 for r in rows)} of {n}")  # fmt: skip
    walls = ", ".join(f"{r['session']} {r['rest_wall_s']:.0f} s" for r in rows)
    print(f"REST job wall time (fit on 80% + score + refit on all): {walls}")


def _plot(rows: list[dict], seconds: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    w = 0.8 / len(COLUMNS)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, c in enumerate(COLUMNS):
        ax.bar(x + (i - len(COLUMNS) / 2 + 0.5) * w, [r[c] for r in rows], w, label=c)
    ax.set_xticks(x, [r["session"] for r in rows])
    ax.set_ylabel("R² on the last 30% (causal)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Leave-one-session-out through REST vs offline, {seconds:g} s of calibration")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
