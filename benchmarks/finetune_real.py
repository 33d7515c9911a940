"""Per-session full fine-tuning of a pretrained model on the seven real sessions.

POYO's recipe for a session the model already knows: start from the multi-session
pretrained weights, then fine-tune every shared weight on that one session
(``calibrate.fine_tune``: unit and session embeddings stay as pretraining left them, AdamW
at ``--lr`` after a 10-step warm-up, gradients clipped at 1). Does that make the model
beat the reference GRU (benchmarks/results/baselines_real.txt, "(ref)" column)?

Data rule (the same as every other real-data figure): ``time_split`` cuts each session into
``.train`` (0-63%), ``.valid`` (63-70%) and ``.test`` (70-100%). The models were pretrained
on the first 63% (their validation tail was never trained on), so no unit identification
is needed. Fine-tuning sees only ``.train``; the valid R² is scored every
``--eval-every`` steps and the best-on-valid weights are kept (step 0, the pretrained
model itself, included), so ``.valid`` alone picks the step; ``.test`` is scored once for
the pretrained model and once for the kept weights, and is never used for a choice.
Every R² is causal (a prediction at t from spikes up to t: ``calibrate.score_span``).

The output per session is ``Session.default_output()`` (hand_vel, or force on the jango
wrist-isometric days), as ``bci-decoder evaluate`` picks it.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_real.py \\
        --model models/poyo-mp-small --steps 300 --lr 2e-4 --eval-every 50

One torch thread. ``cpu_s`` is the process CPU time of the fine-tune (its valid scoring
included), ``wall_s`` its wall time (inflated on a shared machine; the load average is
recorded). Each session's result is merged into ``--json`` as it finishes (keyed by
session and ``--tag``, so several settings live in one file and a killed run keeps what
finished); the table printed and written to ``--txt`` covers every run in the file.
``--cost`` only times ``--cost-steps`` fine-tune steps and one valid score per session
(to size ``--steps`` and ``--eval-every``); it writes nothing. ``--table-only`` rebuilds
the table and picture from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, find_session_file, run_info
from baselines_real import REFERENCE

from bci_decoder.calibrate import (
    CalibrationSettings,
    SecondStage,
    _batch_size,
    fine_tune,
    score_span,
)
from bci_decoder.data.nwb import read_nwb
from bci_decoder.data.session import time_split
from bci_decoder.model.decoder import Decoder

RESULTS = ROOT / "benchmarks" / "results"
# Reference GRU (test R², last 30%): issue 8's figures, kept in baselines_real.py; the
# tuned 3-seed GRU ensemble: benchmarks/results/baselines_real.json (measured)
REF_GRU = REFERENCE["gru"]
TUNED_GRU = {
    r["session"]: r["gru"]["r2"]
    for r in json.loads((RESULTS / "baselines_real.json").read_text())["rows"]
}
SESSIONS = list(REF_GRU)
GOAL_WINS, GOAL_GAIN = 6, 0.03


def settings(args: argparse.Namespace) -> tuple[CalibrationSettings, SecondStage]:
    st = CalibrationSettings(threads=1, seed=args.seed)
    for key in ("batch_size", "spike_budget", "sequence", "burn_in", "max_queries"):
        value = getattr(args, key)
        if value is not None:
            setattr(st, key, value)
    stage = SecondStage(lr=args.lr, eval_every=args.eval_every, weight_decay=args.weight_decay)
    return st, stage


def tag_of(args: argparse.Namespace) -> str:
    if args.tag:
        return args.tag
    parts = [Path(args.model).name, f"lr={args.lr:g}", f"steps={args.steps}"]
    for key in ("batch_size", "spike_budget", "sequence", "burn_in", "max_queries"):
        if getattr(args, key) is not None:
            parts.append(f"{key}={getattr(args, key)}")
    if args.weight_decay:
        parts.append(f"wd={args.weight_decay:g}")
    if args.seed:
        parts.append(f"seed={args.seed}")
    return ",".join(parts)


def cost(decoder: Decoder, session, output: str, args: argparse.Namespace) -> None:
    """Print the CPU seconds of a fine-tune step and of one valid score (and a test score)."""
    split = time_split(session)
    st, stage = settings(args)
    dec = decoder.clone()
    c0 = time.process_time()
    r_valid = score_span(dec, session, output, split.valid)
    c_valid = time.process_time() - c0
    c0 = time.process_time()
    fine_tune(dec, session, output, split.train, st, stage, args.cost_steps)
    c_steps = (time.process_time() - c0) / args.cost_steps
    bs = _batch_size(session, split.train, decoder.config.latent_step, st)
    print(
        f"{session.session_id:<22} {output:<9} {session.domain[1] - session.domain[0]:>7.0f} s  "
        f"{session.num_units:>4} units  seq/step {bs:>2}  step {c_steps:6.2f} CPU s  "
        f"valid score {c_valid:6.1f} CPU s (R² {r_valid:.3f})",
        flush=True,
    )


def run_one(decoder: Decoder, session, output: str, args: argparse.Namespace) -> dict:
    split = time_split(session)
    st, stage = settings(args)
    sid = session.session_id
    c0 = time.process_time()
    base = score_span(decoder, session, output, split.test)
    base_cpu = time.process_time() - c0
    print(f"{sid}: base test R² {base:.3f} ({base_cpu:.0f} CPU s)", flush=True)
    losses: list[float] = []
    marks: list[tuple[int, float]] = []

    def progress(step: int, loss: float) -> None:
        losses.append(loss)
        if step % stage.eval_every == 0 or step == args.steps:
            marks.append((step, time.process_time() - c1))
            print(
                f"  step {step:>5}  loss (mean of last {stage.eval_every}) "
                f"{np.mean(losses[-stage.eval_every :]):.4f}  {time.process_time() - c1:7.0f} CPU s",
                flush=True,
            )

    c1, t1 = time.process_time(), time.perf_counter()
    tuned, curve = fine_tune(
        decoder, session, output, split.train, st, stage, args.steps,
        eval_span=split.valid, progress=progress,
    )  # fmt: skip
    cpu, wall = time.process_time() - c1, time.perf_counter() - t1
    for step, r in curve:
        print(f"  valid R² at step {step:>5}: {r:.3f}", flush=True)
    best_step, _ = max(curve, key=lambda c: c[1])  # the first maximum, as fine_tune keeps
    c2 = time.process_time()
    tuned_r2 = score_span(tuned, session, output, split.test) if best_step else base
    print(
        f"{sid}: fine-tuned test R² {tuned_r2:.3f} (best valid step {best_step}), "
        f"ref GRU {REF_GRU.get(sid, float('nan')):.3f}; fine-tune {cpu:.0f} CPU s, {wall:.0f} s",
        flush=True,
    )
    every = max(1, len(losses) // 100)
    return {
        "session": sid,
        "tag": tag_of(args),
        "model": str(args.model),
        "output": output,
        "steps": args.steps,
        "lr": args.lr,
        "eval_every": args.eval_every,
        "weight_decay": args.weight_decay,
        "sequences_per_step": _batch_size(session, split.train, decoder.config.latent_step, st),
        "calibration_settings": {
            k: getattr(st, k)
            for k in ("batch_size", "spike_budget", "sequence", "burn_in", "max_queries", "seed")
        },
        "spans": {"train": split.train, "valid": split.valid, "test": split.test},
        "base_test_r2": float(base),
        "tuned_test_r2": float(tuned_r2),
        "ref_gru": REF_GRU.get(sid),
        "tuned_gru": TUNED_GRU.get(sid),
        "best_step": int(best_step),
        "valid_curve": [[int(s), float(r)] for s, r in curve],
        "loss_every": every,
        "loss": [float(np.mean(losses[i : i + every])) for i in range(0, len(losses), every)],
        "cpu_at_eval": marks,
        "cpu_s": cpu,
        "wall_s": wall,
        "base_score_cpu_s": base_cpu,
        "test_score_cpu_s": time.process_time() - c2,
        "load_average": list(os.getloadavg()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def table(runs: list[dict]) -> tuple[list[str], dict]:
    tags = list(dict.fromkeys(r["tag"] for r in runs))
    by = {(r["session"], r["tag"]): r for r in runs}
    lines, summary = [], {}
    for tag in tags:
        have = [s for s in SESSIONS if (s, tag) in by]
        have += sorted({r["session"] for r in runs if r["tag"] == tag} - set(have))
        lines.append(f"setting: {tag}")
        lines.append(
            f"| {'session':<22} | {'out':<8} | base test R² | fine-tuned test R² | ref GRU |"
            f" win/loss | Δ vs ref | best step | valid base→best | CPU s | wall s |"
        )
        lines.append("|" + "|".join("---" for _ in range(11)) + "|")
        for s in have:
            r = by[(s, tag)]
            ref = r.get("ref_gru")
            win = "—" if ref is None else ("win" if r["tuned_test_r2"] > ref else "loss")
            d = "" if ref is None else f"{r['tuned_test_r2'] - ref:+.3f}"
            v0, vb = r["valid_curve"][0][1], max(c[1] for c in r["valid_curve"])
            lines.append(
                f"| {s:<22} | {r['output']:<8} | {r['base_test_r2']:.3f} | {r['tuned_test_r2']:.3f}"
                f" | {ref if ref is not None else float('nan'):.3f} | {win} | {d} |"
                f" {r['best_step']}/{r['steps']} | {v0:.3f}→{vb:.3f} | {r['cpu_s']:.0f} |"
                f" {r['wall_s']:.0f} |"
            )
        refd = [s for s in have if by[(s, tag)].get("ref_gru") is not None]
        if refd:
            base = float(np.mean([by[(s, tag)]["base_test_r2"] for s in refd]))
            tuned = float(np.mean([by[(s, tag)]["tuned_test_r2"] for s in refd]))
            ref = float(np.mean([REF_GRU[s] for s in refd]))
            tgru = float(np.mean([TUNED_GRU[s] for s in refd]))
            wins = sum(by[(s, tag)]["tuned_test_r2"] > REF_GRU[s] for s in refd)
            base_wins = sum(by[(s, tag)]["base_test_r2"] > REF_GRU[s] for s in refd)
            twins = sum(by[(s, tag)]["tuned_test_r2"] > TUNED_GRU[s] for s in refd)
            complete = len(refd) == len(SESSIONS)
            goal = complete and wins >= GOAL_WINS and tuned - ref >= GOAL_GAIN
            lines.append(
                f"| **mean ({len(refd)})** | | **{base:.3f}** | **{tuned:.3f}** | **{ref:.3f}** |"
                f" {wins}/{len(refd)} | {tuned - ref:+.3f} | | | "
                f"{sum(by[(s, tag)]['cpu_s'] for s in refd):.0f} | |"
            )
            lines.append(
                f"wins vs reference GRU: fine-tuned {wins}/{len(refd)}, pretrained {base_wins}/"
                f"{len(refd)}; vs tuned GRU ensemble (mean {tgru:.3f}): fine-tuned {twins}/"
                f"{len(refd)}, mean Δ {tuned - tgru:+.3f}. Goal (≥{GOAL_WINS}/7 wins and mean "
                f"≥ +{GOAL_GAIN} over the reference GRU): "
                + ("MET" if goal else "not met" + ("" if complete else " (not all 7 sessions)"))
            )
            summary[tag] = {
                "sessions": len(refd),
                "mean_base_test_r2": base,
                "mean_tuned_test_r2": tuned,
                "mean_ref_gru": ref,
                "mean_tuned_gru": tgru,
                "wins_vs_ref_gru": int(wins),
                "base_wins_vs_ref_gru": int(base_wins),
                "wins_vs_tuned_gru": int(twins),
                "goal_met": bool(goal),
            }
        lines.append("")
    return lines, summary


def draw(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = list(dict.fromkeys(r["tag"] for r in runs))
    by = {(r["session"], r["tag"]): r for r in runs}
    sessions = [s for s in SESSIONS if any((s, t) in by for t in tags)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    x = np.arange(len(sessions))
    width = 0.8 / (2 + len(tags))
    base = [next(by[(s, t)]["base_test_r2"] for t in tags if (s, t) in by) for s in sessions]
    ax.bar(x - 0.4 + width / 2, [REF_GRU[s] for s in sessions], width, color="0.45",
           label="reference GRU")  # fmt: skip
    ax.bar(x - 0.4 + 1.5 * width, base, width, color="tab:blue", label="pretrained")
    colors = plt.cm.Reds(np.linspace(0.5, 0.9, len(tags)))
    for i, t in enumerate(tags):
        vals = [by[(s, t)]["tuned_test_r2"] if (s, t) in by else np.nan for s in sessions]
        ax.bar(x - 0.4 + (2.5 + i) * width, vals, width, color=colors[i], label=f"fine-tuned: {t}")
    ax.set_xticks(x, [s.replace("_", "\n", 1) for s in sessions], fontsize=8)
    ax.set_ylabel("test R² (last 30%, causal)")
    ax.set_ylim(0.4, 1.0)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("per-session full fine-tuning vs the reference GRU")
    ax = axes[1]
    styles = ["-", "--", ":", "-."]
    for j, s in enumerate(sessions):
        for i, t in enumerate(tags):
            if (s, t) not in by:
                continue
            c = np.array(by[(s, t)]["valid_curve"])
            ax.plot(c[:, 0], c[:, 1] - c[0, 1], marker=".", ls=styles[i % 4], color=f"C{j}",
                    label=s if i == 0 else None)  # fmt: skip
    for i, t in enumerate(tags):
        ax.plot([], [], ls=styles[i % 4], color="k", label=t)
    ax.axhline(0, color="0.45", lw=0.8)
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("valid R² − pretrained valid R²")
    ax.set_title("valid curves (.valid, 63-70%); line style = setting")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def write(path: Path, txt: Path, png: Path | None, info: dict, runs: list[dict]) -> None:
    lines, summary = table(runs)
    payload = {"run_info": info, "summary": summary, "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    header = [
        f"{info.get('command', '')}",
        f"commit {info.get('commit', '')[:7]}{' (dirty)' if info.get('dirty') else ''}, "
        f"1 torch thread, load {info.get('load_average')} on {info.get('cpus')} CPUs",
        "R²: causal, test = last 30%; fine-tuned on 0-63%, best step chosen on 63-70%",
        "",
    ]
    txt.write_text("\n".join(header + lines) + "\n")
    print("\n".join(lines), flush=True)
    if png is not None:
        try:
            draw(runs, png)
        except Exception as e:  # a picture must not cost the numbers
            print(f"no picture: {e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("models/poyo-mp-small"))
    ap.add_argument("--sessions", nargs="+", default=SESSIONS)
    ap.add_argument("--steps", type=int, default=300, help="fine-tune steps")
    ap.add_argument("--lr", type=float, default=2e-4, help="AdamW lr (SecondStage.lr)")
    ap.add_argument("--eval-every", type=int, default=50, help="valid score every n steps")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("training sequences (CalibrationSettings; default: its defaults)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step, at most")
    g.add_argument("--spike-budget", type=int, default=None, help="spike tokens per step")
    g.add_argument("--sequence", type=float, default=None, help="s per sequence")
    g.add_argument("--burn-in", type=float, default=None, help="s without loss per sequence")
    g.add_argument("--max-queries", type=int, default=None, help="scored samples per sequence")
    ap.add_argument("--tag", default="", help="name of this setting (default: from the args)")
    ap.add_argument("--json", type=Path, default=RESULTS / "finetune_real.json")
    ap.add_argument("--txt", type=Path, default=RESULTS / "finetune_real.txt")
    ap.add_argument("--png", type=Path, default=RESULTS / "finetune_real.png")
    ap.add_argument("--rerun", action="store_true", help="run again what the --json has")
    ap.add_argument("--cost", action="store_true", help="only time steps and a valid score")
    ap.add_argument("--cost-steps", type=int, default=5)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    stored = json.loads(args.json.read_text()) if args.json.exists() else {}
    runs: list[dict] = stored.get("runs", [])
    info = run_info() | {"torch_threads": torch.get_num_threads()}
    if args.table_only:
        write(args.json, args.txt, args.png, stored.get("run_info", info), runs)
        return
    decoder = Decoder.load(args.model)
    tag = tag_of(args)
    for sid in args.sessions:
        if (
            not args.cost
            and not args.rerun
            and any((r["session"], r["tag"]) == (sid, tag) for r in runs)
        ):
            print(f"{sid}: {tag} in {args.json}: skipped", flush=True)
            continue
        session = read_nwb(find_session_file(sid))
        output = session.default_output()
        if args.cost:
            cost(decoder, session, output, args)
            continue
        r = run_one(decoder, session, output, args) | {"run": info}
        stored = json.loads(args.json.read_text()) if args.json.exists() else {}
        runs = [x for x in stored.get("runs", []) if (x["session"], x["tag"]) != (sid, tag)]
        runs.append(r)
        write(args.json, args.txt, args.png, info, runs)


if __name__ == "__main__":
    main()
