"""Does a new day's zero-shot decode fail on its signal or on its axes?

A known subject's new day decodes with no calibration at all (``calibrate.zero_shot``: the
earlier day's unit rows and behaviour normalisation). Where that R² is far below zero, this
prints the correlation of every decoded dimension with every true one on the test part
(the last 30%): a high correlation off the diagonal means the day's behaviour columns are
ordered or signed differently from the day the model learned, which no label-free method
can know (unit identification with labels refits it; the decoder itself is fine).

    .venv/bin/python benchmarks/zero_shot_axes.py --model models/poyo-mp-transfer-s2 \\
        --sessions jango_20160711_wfiso spike_20120904_wf \\
        --json benchmarks/results/zero_shot_axes.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _common import find_session_file, run_info, write_json

from bci_decoder.calibrate import decode_causal, session_tokens, zero_shot
from bci_decoder.data.nwb import read_nwb
from bci_decoder.data.session import time_split
from bci_decoder.metrics import r2_score
from bci_decoder.train.checkpoint import Decoder


def axes_report(decoder: Decoder, session_id: str) -> dict:
    """Zero-shot R², and corr[i][j] of decoded dimension i with true dimension j."""
    s = read_nwb(find_session_file(session_id))
    output = s.default_output()
    split = time_split(s)
    start = split.fit[0]
    cal = zero_shot(decoder, s, output, "name", (start, start + 60.0))
    times, units, sidx = session_tokens(cal, s)
    beh = s.behavior[output].between(*split.test)
    z = decode_causal(cal, times, units, sidx, output, beh.timestamps)
    pred, true = cal.norms[s.session_id][output].inverse(z), beh.data  # (T, D) each
    D = true.shape[1]
    corr = [[float(np.corrcoef(pred[:, i], true[:, j])[0, 1]) for j in range(D)] for i in range(D)]
    best = [int(np.argmax(np.abs(row))) for row in corr]
    return {
        "output": output,
        "r2": float(r2_score(true, pred)),
        "corr": corr,
        "best_true_dim_of_each_decoded_dim": best,
        "axes_match": best == list(range(D)),
        "units_matched": cal.info["warm_start"].get("units_matched"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("models/poyo-mp-transfer-s2"))
    ap.add_argument("--sessions", nargs="+")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    args = ap.parse_args()
    if args.plot_only:
        from _plots import plot_only

        plot_only("zero_shot_axes", args.plot_only)
        return
    if not args.sessions:
        ap.error("--sessions is required")
    torch.set_num_threads(1)
    dec = Decoder.load(args.model)
    rows = {}
    print(f"{'session':<24} {'output':<10} {'zero-shot R²':>12}  corr(decoded i, true j)")
    for sid in args.sessions:
        r = rows[sid] = axes_report(dec, sid)
        cells = "  ".join(" ".join(f"{c:+.2f}" for c in row) for row in r["corr"])
        flag = "" if r["axes_match"] else "   <- axes differ from the learned day"
        print(f"{sid:<24} {r['output']:<10} {r['r2']:>12.3f}  {cells}{flag}")
    res = run_info() | {"model": str(args.model), "sessions": rows}
    write_json(args.json, res)
    from _plots import draw

    draw("zero_shot_axes", res, args.json)


if __name__ == "__main__":
    main()
