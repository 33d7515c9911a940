"""Leave-sessions-out unit identification on the real recordings.

A model pretrained without the held-out sessions (configs/loso.yaml) is calibrated on the
first S seconds of each held-out session's training part, for several S; the last 30% is
scored, next to a Wiener filter and a causal GRU trained on the same S seconds and on the
full first 70%.

    .venv/bin/python benchmarks/unit_identification.py --model models/poyo-mp-small-loso3 \
        --seconds 30 60 120 --json benchmarks/results/unit_identification.json \
        | tee benchmarks/results/unit_identification.txt

Calibration runs on one torch thread, as the REST calibration job does; ``wall_s`` is the
fit's wall time and ``cpu_s`` its process CPU time (the machine may be shared: the load
average at the start is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bci_decoder.baselines import evaluate_baselines
from bci_decoder.calibrate import CalibrationSettings, fit_units, score_span
from bci_decoder.data.nwb import read_nwb
from bci_decoder.data.session import time_split
from bci_decoder.train.checkpoint import Decoder

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("runs/loso"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument(
        "--sessions",
        nargs="+",
        default=None,
        help="held-out session ids (default: the model's excluded ones)",
    )
    ap.add_argument("--seconds", type=float, nargs="+", default=[30.0, 60.0, 120.0])
    ap.add_argument(
        "--steps", type=int, default=None, help="calibration steps (default: CalibrationSettings)"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()}")

    dec = Decoder.load(args.model)
    held_out = args.sessions or dec.info.get("train_config", {}).get("data", {}).get("exclude", [])
    if not held_out:
        raise SystemExit("no held-out sessions: pass --sessions")
    rows = []
    for sid in held_out:
        if sid in dec.sessions:
            raise SystemExit(f"{sid} was in the pretraining data: not a held-out session")
        session = read_nwb(next(args.data.glob(f"{sid}*.nwb")))
        output = session.default_output()
        split = time_split(session)
        full = evaluate_baselines(session, output, split.fit, split.test, ("wiener", "gru"))
        for seconds in args.seconds:
            start = split.fit[0]
            stop = min(start + seconds, split.fit[1])
            settings = CalibrationSettings(**({"steps": args.steps} if args.steps else {}))
            t0, c0 = time.perf_counter(), time.process_time()
            cal = fit_units(dec, session, output, (start, stop), settings)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            same = evaluate_baselines(session, output, (start, stop), split.test, ("wiener", "gru"))
            row = {
                "session": sid,
                "requested_seconds": seconds,
                "seconds": stop - start,  # less where the training part is shorter
                "r2": score_span(cal, session, output, split.test),
                "wiener_same_seconds": same["wiener"]["r2"],
                "gru_same_seconds": same["gru"]["r2"],
                "wiener_full": full["wiener"]["r2"],
                "gru_full": full["gru"]["r2"],
                "wall_s": wall,
                "cpu_s": cpu,
            }
            rows.append(row)
            print(json.dumps(row))
    cols = [
        "r2",
        "wiener_same_seconds",
        "gru_same_seconds",
        "wiener_full",
        "gru_full",
        "wall_s",
        "cpu_s",
    ]
    print(f"\n{'session':<22}{'s':>6}" + "".join(f"{c:>20}" for c in cols))
    for r in rows:
        print(f"{r['session']:<22}{r['seconds']:>6.0f}" + "".join(f"{r[c]:>20.3f}" for c in cols))
    for s in args.seconds:
        sel = [r for r in rows if r["requested_seconds"] == s]
        if sel:
            print(
                f"mean @ {s:.0f}s: "
                + "  ".join(f"{c}={np.mean([r[c] for r in sel]):.3f}" for c in cols)
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "model": str(args.model),
                    "settings": asdict(
                        CalibrationSettings(**({"steps": args.steps} if args.steps else {}))
                    ),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
