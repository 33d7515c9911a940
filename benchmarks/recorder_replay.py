"""The recorder over a long replay: does the file hold every spike received and every
output sent (issue 11: 5 minutes at 100 Hz, counts equal to ``/status``)?

The daemon (``create_app`` on uvicorn, real LSL) records to HDF5 while the simulated
session sim7_s0 is replayed in real time for ``--seconds``, with one model swap in the
middle (an event). When the replay has ended the spike counts are frozen and compared
with ``/status``; the decoder is then stopped (its last step count is what ``/status``
said last) and the server closed, and the file is read back: spike times and units equal
to what the replayer sent, outputs equal to the steps, nothing lost.

    .venv/bin/python benchmarks/recorder_replay.py --seconds 300 \\
        --json benchmarks/results/recorder_replay.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, run_info, write_json

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests/daemon_harness: the same server the tests use

from bci_decoder.data.simulate import SimConfig, simulate_session  # noqa: E402
from bci_decoder.runtime.recorder import open_recording, summary  # noqa: E402
from bci_decoder.runtime.replay import Replayer  # noqa: E402
from tests.daemon_harness import LiveServer, serve_config  # noqa: E402


def run(seconds: float, model: str) -> dict:
    session = simulate_session(SimConfig(seed=7, num_sessions=1, duration_s=seconds + 5), 0)
    tmp = Path(tempfile.mkdtemp(prefix="recorder-replay-"))
    path = tmp / "rec.h5"
    cfg = serve_config(tmp / "serve", model=model, cadence_hz=100, recording={"path": str(path)})
    with LiveServer(cfg) as srv:
        srv.post("/decoder/start")
        rep = Replayer(session, start=0.0, stop=seconds, source_id=cfg.spikes.source_id,
                       wait_for_consumer_s=10)  # fmt: skip
        rep.start()
        srv.wait_state("running")
        time.sleep(seconds / 2)
        srv.put("/model", json={"name": model}).raise_for_status()  # a swap: an event
        rep.done.wait(seconds + 60)
        time.sleep(1.0)  # the last spikes have arrived: the spike counts are frozen
        st = srv.status()
        d = srv.daemon
        loop, binlet = d.loop, d.behavior_inlet
        srv.post("/decoder/stop")
        steps, missed, behavior = loop.stats.steps, loop.stats.missed, binlet.stats.kept
    t0 = time.monotonic()
    info = summary(path)  # the server closed: the recorder's last flush is in
    with open_recording(path) as f:
        same_spikes = bool(
            np.array_equal(f["spikes/time"][:], rep.log.spike_time)
            and np.array_equal(f["spikes/unit"][:], rep.log.spike_unit)
        )
        out_t = f["outputs/time"][:]
        regular = bool(np.all(np.diff(out_t) > 0))
    return {
        "seconds": seconds,
        "file": str(path),
        "file_mb": path.stat().st_size / 2**20,
        "read_s": time.monotonic() - t0,
        "replayed": {"spikes": len(rep.log.spike_time), "behavior": len(rep.log.behavior_time)},
        "status": {
            "received": st["stream"]["received"],
            "kept": st["stream"]["kept"],
            "dropped": {k: v for k, v in st["dropped"].items() if v},
            "steps_final": steps,
            "missed": missed,
            "behavior_kept": behavior,
        },
        "file_counts": {k: info[k]["count"] for k in ("spikes", "behavior", "outputs", "events")},
        "lost": info["lost"],
        "events": info["events"]["kinds"],
        "spikes_identical": same_spikes,
        "output_times_increasing": regular,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--model", default="poyo-mp-small")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    a = ap.parse_args(argv)
    if a.plot_only:
        from _plots import plot_only

        plot_only("recorder_replay", a.plot_only)
        return json.loads(a.plot_only.read_text())
    info = run_info()
    res = run(a.seconds, a.model)
    s, f = res["status"], res["file_counts"]
    res["verdict"] = {
        "spikes_all": f["spikes"] == s["kept"] == s["received"] == res["replayed"]["spikes"],
        "outputs_all": f["outputs"] == s["steps_final"],
        "behavior_all": f["behavior"] == s["behavior_kept"] == res["replayed"]["behavior"],
        "nothing_lost": not any(res["lost"].values()),
        "spikes_identical": res["spikes_identical"],
    }
    res["info"] = info | {"load_average_end": list(os.getloadavg())}
    print(f"{'':<10} {'replayed':>9} {'/status':>9} {'file':>9}")
    print(f"{'spikes':<10} {res['replayed']['spikes']:>9} {s['kept']:>9} {f['spikes']:>9}")
    print(f"{'behaviour':<10} {res['replayed']['behavior']:>9} {s['behavior_kept']:>9} "
          f"{f['behavior']:>9}")  # fmt: skip
    print(f"{'outputs':<10} {'':>9} {s['steps_final']:>9} {f['outputs']:>9}")
    print(
        f"lost {res['lost']}, events {res['events']}, {res['file_mb']:.1f} MB, "
        f"missed {s['missed']}; load {info['load_average']} -> {res['info']['load_average_end']}"
    )
    print(res["verdict"])
    write_json(a.json, res)
    from _plots import draw

    draw("recorder_replay", res, a.json)
    return res


if __name__ == "__main__":
    main()
