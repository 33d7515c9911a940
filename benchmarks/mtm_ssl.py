"""MtM vs temporal-only masking vs the smoothing baseline, in bits per spike.

Two models of the same backbone and the same compute (configs/mtm-sim.yaml: all five
schemes; configs/mtm-sim-temporal.yaml: temporal masking only; same steps, batch and
seed) are trained on the training parts of two simulated two-region sessions, then scored
by ``bci_decoder.ssl_eval`` on the sessions' last 30%: co-smoothing (20% of units held out,
fixed seed), forward prediction (last 200 ms of each 1 s window) and region prediction,
next to NLB's smoothing baseline (Gaussian-smoothed spikes -> Poisson GLM).

    nice -n 10 .venv/bin/bci-decoder train --config configs/mtm-sim.yaml
    nice -n 10 .venv/bin/bci-decoder train --config configs/mtm-sim-temporal.yaml
    nice -n 10 .venv/bin/python benchmarks/mtm_ssl.py --json benchmarks/results/mtm_ssl.json \
        | tee benchmarks/results/mtm_ssl.txt

The real-session study (seven sessions of ../shared/data/real and NLB's MC_Maze_Small, 50 ms
bins, the bin width of the config's masked objective):

    .venv/bin/bci-decoder train --config configs/mtm-real.yaml
    .venv/bin/bci-decoder train --config configs/mtm-real-temporal.yaml
    .venv/bin/python benchmarks/mtm_ssl.py --config configs/mtm-real.yaml \
        --mtm out/mtm-real --temporal out/mtm-real-temporal \
        --json benchmarks/results/mtm_ssl_real.json | tee benchmarks/results/mtm_ssl_real.txt

A PNG next to the JSON shows each session's co-smoothing and forward-prediction bps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _plots import draw, plot_only

from bci_decoder.config import load_train_config
from bci_decoder.ssl_eval import SSLEvalSettings, evaluate_ssl, format_table
from bci_decoder.train.checkpoint import Decoder
from bci_decoder.train.loop import selected_sessions


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", type=Path, default=Path("configs/mtm-sim.yaml"))
    ap.add_argument("--mtm", type=Path, default=Path("out/mtm-sim"))
    ap.add_argument("--temporal", type=Path, default=Path("out/mtm-sim-temporal"))
    ap.add_argument("--max-windows", type=int, default=72)
    ap.add_argument(
        "--bin-width",
        type=float,
        default=None,
        help="s; default: the config's mtm.bin_width (the bins the models were trained on)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--plot-only", type=Path, metavar="JSON", help="redraw the PNG of an existing result"
    )
    args = ap.parse_args()
    if args.plot_only:
        plot_only("mtm_ssl", args.plot_only)
        return
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    print(f"load average at start: {load0}")
    models = {"mtm": Decoder.load(args.mtm), "temporal-only": Decoder.load(args.temporal)}
    for name, dec in models.items():
        print(
            f"{name}: {dec.info.get('steps')} steps, schemes {dec.info['train_config']['mtm']['schemes']}"
        )
    cfg = load_train_config(args.config)
    bin_width = args.bin_width or cfg.mtm.bin_width
    print(f"bins of {bin_width * 1000:g} ms")
    sessions = selected_sessions(cfg)  # with or without behaviour (MC_Maze_Small has none)
    t0 = time.perf_counter()
    settings = SSLEvalSettings(max_windows=args.max_windows, bin_width=bin_width)
    report = evaluate_ssl(models, sessions, settings)
    print(format_table(report))
    report |= {
        "command": " ".join([sys.executable, *sys.argv]),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t0,
        "models": {k: str(v) for k, v in {"mtm": args.mtm, "temporal-only": args.temporal}.items()},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        draw("mtm_ssl", report, args.json)


if __name__ == "__main__":
    main()
