"""Label-free calibration of a new simulated session, next to supervised unit identification.

The supervised shipped model (models/poyo-mp-small, pretrained on 7 real and 3 simulated
sessions, seed 7) gets an MtM head fitted on the training parts of its three simulated
sessions with every other weight frozen (``train_mtm_head``: the behaviour readout does
not move). A fourth session of the same simulator (``sim7_s3``: new units, new trajectory,
never seen) is then calibrated

- with zero labels (``fit_units_unsupervised``: the masked objective on its spikes only,
  on the first 60 s of its training part; ``--full``: on the whole first 70%),
- supervised, on the first 60 s with behaviour (``fit_units``),
- not at all (new units at the mean of the pretrained ones; the floor),

and each is scored in causal mode (R², the last 30%). A Wiener filter on the same 60 s
with labels is the bar the issue names as the moonshot.

    nice -n 10 .venv/bin/python benchmarks/mtm_label_free.py \
        --json benchmarks/results/mtm_label_free.json | tee benchmarks/results/mtm_label_free.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _plots import draw

from bci_decoder.baselines import evaluate_baselines
from bci_decoder.calibrate import CalibrationSettings, add_session, fit_units, score_span
from bci_decoder.calibrate_unsupervised import (
    UnsupervisedSettings,
    fit_units_unsupervised,
    unlabelled_norm,
)
from bci_decoder.config import MtMSettings
from bci_decoder.data.session import time_split
from bci_decoder.data.simulate import SimConfig, simulate_session, simulate_sessions
from bci_decoder.train.checkpoint import Decoder
from bci_decoder.train.objectives import train_mtm_head


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("models/poyo-mp-small"))
    ap.add_argument("--head-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=150, help="calibration steps, each fit")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--save-head", type=Path, default=Path("out/poyo-mp-small-mtmhead"))
    ap.add_argument("--full", action="store_true", help="also label-free on the whole 70%%")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    print(f"load average at start: {load0}")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()

    sim = SimConfig(seed=7, num_sessions=3, duration_s=300)
    known = simulate_sessions(sim)
    new = simulate_session(sim.model_copy(update={"num_sessions": 4}), 3)
    dec = Decoder.load(args.model)
    if args.save_head and (args.save_head / "meta.json").exists():
        head = Decoder.load(args.save_head)
        head_info = {"loaded": str(args.save_head)}
    else:
        t0 = time.process_time()
        mtm = MtMSettings(enabled=True, batch_size=8)
        head, losses = train_mtm_head(dec, known, mtm, args.head_steps, progress=True)
        head_info = {
            "steps": args.head_steps,
            "cpu_s": time.process_time() - t0,
            "loss_first50": float(np.mean(losses[:50])),
            "loss_last50": float(np.mean(losses[-50:])),
        }
        if args.save_head:
            head.save(args.save_head)
    print(f"MtM head: {head_info}")

    split = time_split(new)
    output = "hand_vel"
    short = (split.fit[0], split.fit[0] + args.seconds)
    rows: dict[str, dict] = {}

    def run(name: str, fit) -> None:
        t0 = time.process_time()
        calibrated = fit()
        cpu = time.process_time() - t0
        r2 = score_span(calibrated, new, output, split.test)
        rows[name] = {"r2": r2, "cpu_s": cpu}
        print(f"{name:<36} R² {r2:7.3f}   cpu {cpu:6.1f} s", flush=True)

    norm = unlabelled_norm(head, output)
    run("uncalibrated (mean rows)", lambda: add_session(head, new, output, norm))
    ust = UnsupervisedSettings(steps=args.steps)
    run(
        f"label-free {args.seconds:.0f} s (0 labels)",
        lambda: fit_units_unsupervised(head, new, short, ust),
    )
    if args.full:
        run(
            f"label-free {split.fit[1] - split.fit[0]:.0f} s (0 labels)",
            lambda: fit_units_unsupervised(head, new, split.fit, ust),
        )
    run(
        f"supervised fit_units {args.seconds:.0f} s",
        lambda: fit_units(dec, new, output, short, CalibrationSettings(steps=args.steps)),
    )
    wiener = evaluate_baselines(new, output, short, split.test, ("wiener",))["wiener"]["r2"]
    rows[f"wiener {args.seconds:.0f} s (labels)"] = {"r2": wiener}
    print(f"{'wiener ' + str(int(args.seconds)) + ' s (labels)':<36} R² {wiener:7.3f}")
    sup = rows[f"supervised fit_units {args.seconds:.0f} s"]["r2"]
    best_free = max(v["r2"] for k, v in rows.items() if k.startswith("label-free"))
    summary = {"label_free_best_r2": best_free, "ratio_to_supervised": best_free / sup}
    print(
        f"label-free best / supervised {args.seconds:.0f} s: {summary['ratio_to_supervised']:.2f}"
    )
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "commit": commit,
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "session": new.session_id,
        "units": new.num_units,
        "head": head_info,
        "calibration_steps": args.steps,
        "results": rows,
        "summary": summary,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        draw("mtm_label_free", report, args.json)


if __name__ == "__main__":
    main()
