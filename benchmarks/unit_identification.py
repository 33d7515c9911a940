"""Leave-sessions-out study: new sessions calibrated with a few labelled seconds.

A model pretrained without the held-out sessions (configs/poyo-mp-transfer.yaml keeps ten
out: later days of Spike and Jango, Chewie 2013-10-03, Mihi) is calibrated on the first S
seconds of each held-out session's training part, for several S, with the product's
default (unit identification, warm-started where the subject is known) and with
``calibrate.adapt`` (a second stage where the block says it helps); the last 30% is
scored, next to a Wiener filter and a causal GRU trained on the same S seconds and on the
full first 70%. The goal line: with 60 s, at least GRU(60 s) + 0.05 on every session,
and a mean within 0.02 of GRU(full 70%).

    .venv/bin/python benchmarks/unit_identification.py --model models/poyo-mp-transfer \
        --seconds 30 60 120 --json benchmarks/results/unit_identification.json

Calibration runs on one torch thread, as the REST calibration job does; ``wall_s`` is the
fit's wall time and ``cpu_s`` its process CPU time (the machine may be shared: the load
average is recorded). Results are cached (benchmarks/_transfer.py), shared with
benchmarks/across_days.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _common import find_session_file, run_info, write_json
from _transfer import Study

from bci_decoder.data.nwb import read_nwb


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("models/poyo-mp-transfer"))
    ap.add_argument(
        "--sessions", nargs="+", default=None, help="default: the model's held-out ones"
    )
    ap.add_argument("--seconds", type=int, nargs="+", default=[30, 60, 120])
    ap.add_argument("--adapt", action="store_true", help="also score calibrate.adapt at each S")
    ap.add_argument(
        "--label-free",
        action="store_true",
        help="also score label-free calibration on the same S s of spikes (needs an MtM head)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    info = run_info()
    study = Study(args.model)
    held_out = args.sessions or study.held_out()
    if not held_out:
        raise SystemExit("no held-out sessions: pass --sessions")
    rows = []
    for sid in held_out:
        session = read_nwb(find_session_file(sid))
        full = {m: study.score(session, m)["r2"] for m in ("gru_full", "wiener_full")}
        for s in args.seconds:
            ui = study.score(session, f"ui_{s}")
            row = {
                "session": sid,
                "subject": session.subject,
                "output": session.default_output(),
                "requested_seconds": s,
                "seconds": ui["seconds"],
                "r2": ui["r2"],
                "warm_start": bool(ui.get("warm")),
                "wall_s": ui["wall_s"],
                "cpu_s": ui["cpu_s"],
                "gru_same_seconds": study.score(session, f"gru_{s}")["r2"],
                "wiener_same_seconds": study.score(session, f"wiener_{s}")["r2"],
                **full,
            }
            if args.adapt:
                ad = study.score(session, f"adapt_{s}")
                row |= {
                    "adapt_r2": ad["r2"],
                    "adapt_second_stage": ad.get("second_stage"),
                    "adapt_wall_s": ad["wall_s"],
                }
            if args.label_free:
                free = study.score(session, f"free_{s}")
                row |= {"free_r2": free["r2"], "free_wall_s": free["wall_s"]}
            rows.append(row)
    cols = ["r2"] + (["adapt_r2"] if args.adapt else []) + (["free_r2"] if args.label_free else [])
    cols += ["gru_same_seconds", "wiener_same_seconds", "gru_full", "wiener_full", "wall_s"]
    lines = [f"{'session':<22}{'s':>5}" + "".join(f"{c:>20}" for c in cols)]
    for r in rows:
        lines.append(
            f"{r['session']:<22}{r['seconds']:>5.0f}" + "".join(f"{r[c]:>20.3f}" for c in cols)
        )
    summary = {}
    for s in args.seconds:
        sel = [r for r in rows if r["requested_seconds"] == s]
        means = {c: float(np.mean([r[c] for r in sel])) for c in cols}
        best = [max(r["r2"], r.get("adapt_r2", -np.inf)) for r in sel]
        summary[s] = means | {
            "sessions_at_gru_same_plus_0.05": int(
                sum(b >= r["gru_same_seconds"] + 0.05 for b, r in zip(best, sel, strict=True))
            ),
            "sessions": len(sel),
            "mean_minus_gru_full": float(np.mean(best) - means["gru_full"]),
        }
        if "free_r2" in means:  # label-free as a share of supervised unit identification
            summary[s]["free_over_supervised"] = means["free_r2"] / means["r2"]
        lines.append(
            f"mean @ {s}s: "
            + "  ".join(f"{c}={means[c]:.3f}" for c in cols)
            + f"  | >= GRU({s}s)+0.05 on {summary[s]['sessions_at_gru_same_plus_0.05']}/{len(sel)}"
            + f", mean - GRU(full) {summary[s]['mean_minus_gru_full']:+.3f}"
        )
    print("\n".join(lines))
    result = {**info, "model": str(args.model), "rows": rows, "summary": summary, "table": lines}
    write_json(args.json, result)
    if args.png:
        plot(result, args.png, args.seconds)
    return result


def plot(result: dict, png: Path, seconds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sessions = list(dict.fromkeys(r["session"] for r in rows))
    s = 60 if 60 in seconds else seconds[0]
    sel = {r["session"]: r for r in rows if r["requested_seconds"] == s}
    cols = [
        ("r2", f"ours, {s} s", "tab:blue"),
        ("gru_same_seconds", f"GRU {s} s", "tab:red"),
        ("wiener_same_seconds", f"Wiener {s} s", "tab:orange"),
        ("gru_full", "GRU full 70%", "0.4"),
    ]
    if "adapt_r2" in rows[0]:
        cols.insert(1, ("adapt_r2", f"ours + 2nd stage, {s} s", "tab:purple"))
    if "free_r2" in rows[0]:
        cols.insert(1, ("free_r2", f"ours, label-free on {s} s of spikes", "tab:olive"))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(sessions)), 5))
    width = 0.8 / len(cols)
    x = np.arange(len(sessions))
    for i, (c, label, color) in enumerate(cols):
        ax.bar(x + i * width, [sel[sid][c] for sid in sessions], width, label=label, color=color)
    ax.set_xticks(
        x + 0.4 - width / 2,
        [sid.replace("_wf", "").replace("_co", "") for sid in sessions],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("test R² (last 30%, causal)")
    title = f"Sessions the model never saw, calibrated with {s} s of labels"
    if "free_r2" in rows[0]:
        title += f" (olive: the same {s} s of spikes, no labels)"
    ax.set_title(title)
    ax.set_ylim(min(0, ax.get_ylim()[0]), 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
