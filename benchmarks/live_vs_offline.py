"""Live vs offline: does the daemon decode a real recording as well as ``evaluate`` does?

Replays a span of a real session at 1x into LSL (``bci-decoder replay``), decodes it live
with the daemon (the shipped model knows the session), records the decoded and behaviour
streams in a client process, and scores R² against the behaviour. The same span is then
decoded offline (``bci_decoder.decode.decode_session``, causal mode, predictions at the
behaviour timestamps from spikes up to each), as ``bci-decoder evaluate`` does. Goal
(issue): the live R² within 0.01 of the offline one.

    .venv/bin/python benchmarks/live_vs_offline.py --data ../shared/data/real/stevenson2011_m1.nwb \
        --seconds 300 --json out/live_vs_offline.json
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bci_decoder.data.nwb import read_nwb  # noqa: E402
from bci_decoder.decode import decode_session  # noqa: E402
from bci_decoder.demo import align  # noqa: E402
from bci_decoder.metrics import r2_score  # noqa: E402
from bci_decoder.runtime.processes import ProcessGroup, free_port, wait_http  # noqa: E402
from bci_decoder.train.checkpoint import Decoder  # noqa: E402


def run(
    data: Path, seconds: float, start_frac: float, model: str, cadence: float, work: Path
) -> dict:
    session = read_nwb(data)
    lo, hi = session.domain
    start = lo + start_frac * (hi - lo)
    stop = min(hi, start + seconds)
    tag = uuid.uuid4().hex[:8]
    port, token = free_port(), secrets.token_urlsafe(16)
    sid, cid = f"lvo-{tag}", f"lvo-{tag}-control"
    cfg = {
        "model": model, "models_dir": str(ROOT / "models"), "cadence_hz": cadence,
        "autostart": True, "state_dir": str(ROOT / "out" / "bench-serve"),
        "spikes": {"type": "Spikes", "source_id": sid},
        "behavior": {"type": "Behavior", "source_id": f"{sid}-behavior"},
        "control_source_id": cid, "api": {"host": "127.0.0.1", "port": port, "token": token},
    }  # fmt: skip
    (work / "serve.yaml").write_text(yaml.safe_dump(cfg))
    procs = ProcessGroup(work / "logs")
    url = f"http://127.0.0.1:{port}"
    try:
        procs.python(
            "serve", ["-m", "bci_decoder.cli", "serve", "--config", str(work / "serve.yaml")]
        )
        wait_http(url + "/health", 180, lambda: procs.check("serve"))
        procs.python("client", ["-m", "bci_decoder.runtime.client",
                                "--stream", f"decoded=Control:{cid}",
                                "--stream", f"behavior=Behavior:{sid}-behavior",
                                "--seconds", str(stop - start + 25), "--out", str(work / "c.npz")])  # fmt: skip
        time.sleep(2.0)
        frac = (start - lo) / (hi - lo)
        procs.python("replay", ["-m", "bci_decoder.cli", "replay", str(data), "--start",
                                repr(frac), "--seconds", repr(stop - start), "--source-id", sid,
                                "--log", str(work / "replay.npz")])  # fmt: skip
        print(f"replaying {session.session_id} [{start:.1f}, {stop:.1f}) s at 1x ...", flush=True)
        procs.wait("replay", stop - start + 60)
        status = httpx.get(url + "/status").json()
        procs.wait("client", stop - start + 60)
    finally:
        procs.stop_all()
    rec, log = np.load(work / "c.npz"), np.load(work / "replay.npz")
    base, speed, s0 = float(log["base"]), float(log["speed"]), float(log["start"])
    td, yd = rec["decoded_timestamps"], rec["decoded_values"]
    tb, xb = rec["behavior_timestamps"], rec["behavior_values"]
    pred, ok = align(td, yd, tb, 1.0 / cadence)
    ok &= tb > td[0] + 1.0  # the first second: the decoder's context is still filling
    live = r2_score(xb[ok], pred[ok])
    # offline, at the same behaviour samples (mapped back to session time)
    t_sess = (tb[ok] - base) * speed + s0
    decoder = Decoder.load(ROOT / "models" / model)
    output = status["model"]["output"]
    beh = session.behavior[output]
    idx = np.searchsorted(beh.timestamps, t_sess - 1e-9)
    t_exact = beh.timestamps[np.clip(idx, 0, len(beh.timestamps) - 1)]
    span = (float(t_exact[0]), float(t_exact[-1]) + 1e-6)
    ts, target, offline_pred = decode_session(decoder, session, output, span, "causal")
    off = r2_score(target, offline_pred)
    return {
        "session": session.session_id,
        "span_s": [start, stop],
        "live_r2": live,
        "offline_r2": off,
        "difference": live - off,
        "behaviour_samples": int(ok.sum()),
        "offline_samples": int(len(ts)),
        "steps": status["steps"],
        "missed": status["missed_deadlines"],
        "dropped": sum(status["dropped"].values()),
        "cadence_hz": cadence,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/real/stevenson2011_m1.nwb"
    )
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--start", type=float, default=0.7, help="start at this fraction (test part)")
    ap.add_argument("--model", default="poyo-mp-small")
    ap.add_argument("--cadence", type=float, default=100.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    a = ap.parse_args()
    if a.plot_only:
        from benchmarks._plots import plot_only

        plot_only("live_vs_offline", a.plot_only)
        return
    with tempfile.TemporaryDirectory(prefix="lvo-") as tmp:
        r = run(a.data, a.seconds, a.start, a.model, a.cadence, Path(tmp))
    print(
        f"{r['session']}: live R² {r['live_r2']:.4f} vs offline {r['offline_r2']:.4f} "
        f"(difference {r['difference']:+.4f}; goal |diff| <= 0.01: "
        f"{'met' if abs(r['difference']) <= 0.01 else 'MISSED'}); {r['steps']} steps, "
        f"{r['missed']} missed, {r['dropped']} dropped"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(r, indent=1))
        from benchmarks._plots import draw

        draw("live_vs_offline", r, a.json)


if __name__ == "__main__":
    main()
