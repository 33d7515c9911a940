"""Drift study: later days of a subject the model was pretrained on.

The leave-out model (configs/poyo-mp-transfer.yaml) saw monkey Spike's July-August days;
each later day (September-October) is decoded zero-shot from the warm-started tables
(each channel's embedding from the most recent pretraining day, no fitting, no labels),
after warm-started unit identification on its first 10, 30 and 60 s, and after cold-start
unit identification on 60 s (every unit at the mean, as for an unknown animal), after
unit identification from whichever start scores better on the block's last 20%
(``ui_auto``), label-free on the same 60 s of spikes (``free_60``, a model with an MtM
head), next to a
Wiener filter and a causal GRU on the same 60 s and on the full first 70%, against the
days since the last pretraining day. Every score is on the day's last 30%.

    .venv/bin/python benchmarks/across_days.py --model models/poyo-mp-transfer \
        --json benchmarks/results/across_days.json --png benchmarks/results/across_days.png
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
from _common import find_session_file, run_info, write_json
from _transfer import Study

from bci_decoder.data.nwb import read_nwb
from bci_decoder.subjects import subject_sessions

METHODS = {
    "zero_shot": "zero-shot warm start (0 s)",
    "ui_10": "warm UI 10 s",
    "ui_30": "warm UI 30 s",
    "ui_60": "warm UI 60 s",
    "adapt_60": "warm UI + 2nd stage 60 s",
    "ui_auto_60": "UI 60 s, warm or cold by slice",
    "ui_cold_60": "cold UI 60 s",
    "free_60": "label-free warm 60 s (no labels)",
    "gru_60": "GRU 60 s",
    "wiener_60": "Wiener 60 s",
    "gru_full": "GRU full 70%",
    "wiener_full": "Wiener full 70%",
}


def _date(iso: str) -> dt.date:
    return dt.date.fromisoformat(iso[:10])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("models/poyo-mp-transfer"))
    ap.add_argument("--subject", default="Spike")
    ap.add_argument(
        "--sessions",
        nargs="+",
        default=None,
        help="default: the model's held-out days of --subject",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=[m for m in METHODS if m != "free_60"],
        choices=list(METHODS),
        help="free_60 needs a model with an MtM head (bci-decoder mtm-head)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    info = run_info()
    study = Study(args.model)
    known = subject_sessions(study.decoder.info, args.subject)
    if not known:
        raise SystemExit(f"the model has no pretraining session of {args.subject!r}")
    meta = study.decoder.info["session_meta"]
    last_day = max(_date(meta[s]["recorded_at"]) for s in known)
    rows = []
    for sid in args.sessions or study.held_out():
        session = read_nwb(find_session_file(sid))
        if session.subject != args.subject:
            continue
        row = {
            "session": sid,
            "date": session.recorded_at[:10],
            "days_since_pretraining": (_date(session.recorded_at) - last_day).days,
            "output": session.default_output(),
        }
        for m in args.methods:
            row[m] = study.score(session, m)["r2"]
        rows.append(row)
    if not rows:
        raise SystemExit(f"no held-out day of {args.subject!r}")
    rows.sort(key=lambda r: r["days_since_pretraining"])
    header = f"{'session':<20}{'days':>5}" + "".join(f"{m:>13}" for m in args.methods)
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['session']:<20}{r['days_since_pretraining']:>5}"
            + "".join(f"{r[m]:>13.3f}" for m in args.methods)
        )
    means = {m: float(np.mean([r[m] for r in rows])) for m in args.methods}
    lines.append(f"{'mean':<25}" + "".join(f"{means[m]:>13.3f}" for m in args.methods))
    print("\n".join(lines))
    result = {
        **info,
        "model": str(args.model),
        "last_pretraining_day": last_day.isoformat(),
        "methods": {m: METHODS[m] for m in args.methods},
        "rows": rows,
        "mean": means,
        "table": lines,
    }
    write_json(args.json, result)
    if args.png:
        plot(result, args.png)
    return result


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["days_since_pretraining"] for r in rows]
    styles = {
        "zero_shot": ("tab:green", "o", "-"),
        "ui_10": ("tab:blue", ".", ":"),
        "ui_30": ("tab:blue", "s", "--"),
        "ui_60": ("tab:blue", "o", "-"),
        "adapt_60": ("tab:purple", "D", "-"),
        "ui_auto_60": ("navy", "P", "-"),
        "ui_cold_60": ("tab:cyan", "v", "-"),
        "free_60": ("tab:olive", "X", "-."),
        "gru_60": ("tab:red", "o", "-"),
        "wiener_60": ("tab:orange", "o", "-"),
        "gru_full": ("tab:red", "^", "--"),
        "wiener_full": ("tab:orange", "^", "--"),
    }
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for m, label in result["methods"].items():
        color, marker, ls = styles[m]
        ax.plot(
            x,
            [r[m] for r in rows],
            color=color,
            marker=marker,
            ls=ls,
            label=f"{label} (mean {result['mean'][m]:.2f})",
        )
    ax.set_xlabel(f"days since the last pretraining day ({result['last_pretraining_day']})")
    ax.set_ylabel("test R² (last 30%, causal)")
    ax.set_title("New days of monkey Spike: warm start from earlier days vs training from scratch")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
