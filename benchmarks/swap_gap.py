"""How long a model swap holds the decoded stream up, with and without the GC freeze.

A daemon (``create_app`` on uvicorn, real LSL) decodes stevenson2011_m1 replayed at 100 Hz;
``PUT /model`` swaps the model three times per trial; the largest interval between
decoded outputs within 1 s of each swap is recorded (10 ms = no step missed). Both
settings of ``gc_freeze`` run in the same invocation, alternating trials.

    .venv/bin/python benchmarks/swap_gap.py --trials 3 --json out/swap_gap.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bci_decoder.config import StreamSettings  # noqa: E402
from bci_decoder.data.nwb import read_nwb  # noqa: E402
from bci_decoder.runtime.client import StreamRecorder  # noqa: E402
from bci_decoder.runtime.decode_loop import lsl_clock  # noqa: E402
from bci_decoder.runtime.replay import Replayer  # noqa: E402
from tests.daemon_harness import LiveServer, serve_config  # noqa: E402


def _pull(rec: StreamRecorder, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rec.pull(0.002)


def trial(session, start: float, gc_freeze: bool, swaps: int = 3) -> list[float]:
    cfg = serve_config(Path(tempfile.mkdtemp()), cadence_hz=100, gc_freeze=gc_freeze)
    with LiveServer(cfg) as srv:
        srv.post("/decoder/start")
        rep = Replayer(session, start=start, stop=start + 17.0,
                       source_id=cfg.spikes.source_id, wait_for_consumer_s=10)  # fmt: skip
        rep.start()
        srv.wait_state("running")
        rec = StreamRecorder(StreamSettings(type="Control", source_id=cfg.control_source_id))
        _pull(rec, 3.0)
        at = []
        for _ in range(swaps):
            at.append(lsl_clock())
            srv.put("/model", json={"name": "poyo-mp-small"}).raise_for_status()
            _pull(rec, 2.0)
        t, _, _ = rec.arrays()
        rep.stop()
        srv.post("/decoder/stop")
    gaps = np.diff(t)
    return [float(gaps[np.abs(t[:-1] - a) < 1.0].max() * 1e3) for a in at]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path,
                    default=ROOT.parent / "shared" / "data" / "real" / "stevenson2011_m1.nwb")  # fmt: skip
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    a = ap.parse_args()
    if a.plot_only:
        from benchmarks._plots import plot_only

        plot_only("swap_gap", a.plot_only)
        return
    session = read_nwb(a.data)
    res: dict[str, list[float]] = {"gc_freeze": [], "no_freeze": []}
    for i in range(a.trials):
        for arm, freeze in (("gc_freeze", True), ("no_freeze", False)):
            gaps = trial(session, 215.0 + 20 * i, freeze)
            res[arm] += gaps
            print(f"trial {i} {arm:10s} largest interval at each swap (ms): "
                  f"{[round(g) for g in gaps]}", flush=True)  # fmt: skip
    print(f"\n{'':10s}{'swaps':>7s}{'median ms':>11s}{'max ms':>9s}")
    for arm, g in res.items():
        print(f"{arm:10s}{len(g):7d}{np.median(g):11.0f}{max(g):9.0f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
        from benchmarks._plots import draw

        draw("swap_gap", res, a.json)


if __name__ == "__main__":
    main()
