"""Scaling study: unit identification on new sessions against the number of pretraining
sessions, at equal training steps, next to a GRU trained on the same 60 s.

POYO's claim is that pretraining on more sessions gives a better starting point for a
session the model never saw. Four models share the leave-out recipe
(configs/poyo-mp-transfer.yaml: model size, learning rate, schedule, seed, modes) and
differ only in which of its pretraining sessions they see (``data.include``), nested:

- ``1``: stevenson2011_m1 (M1, hand velocity, 777 s);
- ``4``: + spike_20120831_wf (Spike, cursor), jango_20160626_wfiso (Jango, force),
  chewie_20131219_co (Chewie, hand velocity): one session of each monkey the held-out
  sessions come from, and a head for every output they decode;
- ``12``: + millerlab_s1_area2, jango_20141203_wf, monkeye_20181004_bci,
  monkeye_20190719_bci, spike_20120718/0727/0817/0824_wf (every real monkey, Spike days
  spread over July-August);
- ``all``: every pretraining session of the recipe (24 with behaviour: the 12, nine more
  Spike days and the three simulated sessions).

Each model is calibrated with the product's unit identification (``fit_units``, warm start
by channel name on a known subject's new day) on the first 60 s of each held-out session's
training part and scored on the last 30% (causal), next to a GRU and a Wiener filter
trained on the same 60 s (benchmarks/_transfer.py; its cache is shared with
unit_identification.py). A head is needed for the session's output: the 1-session model
decodes hand velocity only, so it is scored on Chewie and Mihi alone (the others are
reported as ``null``, "no head").

Budget actually run (issue 8, item 6; 2 shared CPU cores, one thread per job, a two-hour
window for everything): NOT the recipe's 3000 steps of batch 16. Every arm gets the same
``--steps`` (default 300) of ``--batch`` (default 8) sequences, which is about 5% of the
recipe's samples: the study measures what more sessions give at a very small, equal
budget, not at convergence. Held-out sessions scored by default: six of the ten, every
monkey (the first, a middle and the last held-out Spike day: spike_20120904/0928/1017_wf;
jango_20160711_wfiso, chewie_20131003_co, mihi_20140303_co); ``--sessions held-out``
scores all ten, as the committed result does (a fit took 1-4 min on the shared core).
``eval_seconds`` (the training loop's own validation, not used here) is cut to 5 s.

Measured (benchmarks/results/scaling.json; training 0.8-1.3 s per step median, 1.0-1.8 s
mean, on one thread of the shared 2-core machine: 5-9 min an arm plus about 1.5 min of data
loading; the 1-session arm is the slowest per step, Stevenson's real spike times being the
densest): at this budget R² falls as sessions are added. Mean over the ten held-out
sessions: 0.33 / 0.16 / 0.27 at 4 / 12 / 24 sessions, against 0.66 for the GRU on the same
60 s and 0.67 for the recipe's own model (3000 x 16, the same 24 sessions); spike_20120912_wf
(GRU 0.19) drags these (-0.78 / -2.21 / -0.55): without it 0.45 / 0.42 / 0.36, GRU 0.71,
recipe 0.71. On Chewie and Mihi, the two every arm can decode: 0.63 / 0.50 / 0.46 / 0.43 at
1 / 4 / 12 / 24, GRU 0.57. With 2,400 samples in all, each of 24 sessions gets about 100:
the arms with more sessions are further from trained (their validation R² after 300 steps
is below 0; the 1-session arm's is 0.71), so this budget cannot test POYO's claim, which
needs each arm trained to convergence (at least the recipe's 3000 x 16: 1-2 h an arm on a
free core).

Reproduce (trains each missing arm into runs/scaling/arm-N, one after the other, then
evaluates; an arm whose model already has ``--steps`` steps is not trained again, so an
interrupted run resumes at the next arm; fits are cached under out/transfer_cache):

    .venv/bin/python benchmarks/scaling.py --train --steps 300 --batch 8 \\
        --reference models/poyo-mp-transfer --sessions held-out \\
        --json benchmarks/results/scaling.json
    .venv/bin/python benchmarks/scaling.py --plot-only benchmarks/results/scaling.json

``--reference`` scores the recipe trained in full (the shipped leave-out model, 3000 steps
of 16, the same 24 sessions as ``all``) beside the arms, as stars in the picture: how far
the arms' budget is from the recipe's. Without ``--train`` it evaluates the arms already
trained and prints the training command of each missing one (``--train-only`` trains and
stops).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import ROOT, find_session_file, run_info, write_json

ONE = ["stevenson2011_m1"]
FOUR = ONE + ["spike_20120831_wf", "jango_20160626_wfiso", "chewie_20131219_co"]
TWELVE = FOUR + [
    "millerlab_s1_area2",
    "jango_20141203_wf",
    "monkeye_20181004_bci",
    "monkeye_20190719_bci",
    "spike_20120718_wf",
    "spike_20120727_wf",
    "spike_20120817_wf",
    "spike_20120824_wf",
]
ARMS: dict[str, list[str] | None] = {"1": ONE, "4": FOUR, "12": TWELVE, "all": None}
ORDER = ["all", "1", "4", "12"]  # training order: the recipe's full set first
EVAL = [
    "spike_20120904_wf",
    "spike_20120928_wf",
    "spike_20121017_wf",
    "jango_20160711_wfiso",
    "chewie_20131003_co",
    "mihi_20140303_co",
]
SECONDS = 60


def arm_config(arm: str, args: argparse.Namespace):
    from bci_decoder.config import load_train_config

    over = {
        "optim.steps": args.steps,
        "sampler.batch_size": args.batch,
        "eval_every": args.steps,
        "eval_seconds": 5.0,
        "threads": 1,
        "out": str(args.out / f"arm-{arm}"),
    }
    if ARMS[arm] is not None:
        over["data.include"] = ARMS[arm]
    return load_train_config(args.config, over)


def trained_steps(folder: Path) -> int:
    meta = folder / "meta.json"
    return int(json.loads(meta.read_text())["info"].get("steps", 0)) if meta.exists() else 0


def train_arm(arm: str, args: argparse.Namespace) -> dict:
    from bci_decoder.train.loop import train

    cfg = arm_config(arm, args)
    out = Path(cfg.out)
    if trained_steps(out) >= args.steps:
        return {"trained_now": False}
    if out.exists():  # a run cut short: start it again from scratch (same seed)
        for f in ("log.jsonl", "meta.json", "model.safetensors", "state.pt"):
            (out / f).unlink(missing_ok=True)
    print(f"training arm {arm} -> {out} ({args.steps} steps of {args.batch})", flush=True)
    t0 = time.perf_counter()
    train(cfg, progress=False)
    return {"trained_now": True, "train_wall_s": time.perf_counter() - t0}


def step_seconds(folder: Path) -> dict:
    """Seconds per training step (median, mean) and of the steps in all, from the run's
    log (its clock starts at the first step; data loading and validation not counted)."""
    log = folder / "log.jsonl"
    t = [r["t"] for r in map(json.loads, log.read_text().splitlines()) if "t" in r]
    if len(t) < 3:
        return {}
    return {"step_s_median": float(np.median(np.diff(t))), "step_s_mean": t[-1] / (len(t) - 1),
            "steps_s": t[-1]}  # fmt: skip


def evaluate_arm(arm: str, folder: Path, sessions: list[str]) -> list[dict]:
    from _transfer import Study

    from bci_decoder.data.nwb import read_nwb

    study = Study(folder)
    heads = study.decoder.model.output_names
    rows = []
    for sid in sessions:
        session = read_nwb(find_session_file(sid))
        output = session.default_output()
        row = {"arm": arm, "session": sid, "subject": session.subject, "output": output}
        if output in heads:
            ui = study.score(session, f"ui_{SECONDS}")
            row |= {"r2": ui["r2"], "seconds": ui["seconds"], "warm_start": bool(ui.get("warm")),
                    "fit_wall_s": ui["wall_s"]}  # fmt: skip
        else:
            row |= {"r2": None, "why": f"no head for {output}: the model decodes {heads}"}
        rows.append(row)
    return rows


def baselines(sessions: list[str]) -> dict[str, dict]:
    from _transfer import Study

    from bci_decoder.data.nwb import read_nwb

    study = Study(None)
    out = {}
    for sid in sessions:
        session = read_nwb(find_session_file(sid))
        out[sid] = {m: study.score(session, f"{m}_{SECONDS}")["r2"] for m in ("gru", "wiener")}
    return out


def table(res: dict) -> list[str]:
    sessions, arms = res["sessions"], [a["arm"] for a in res["arms"]]
    r2 = {(r["arm"], r["session"]): r["r2"] for r in res["rows"]}
    cell = lambda v: f"{v:>10.3f}" if v is not None else f"{'-':>10}"  # noqa: E731
    ref = res.get("reference")
    rr = {r["session"]: r["r2"] for r in ref["rows"]} if ref else {}
    lines = [f"{'held-out session':<22}" + "".join(f"{'n=' + a:>10}" for a in arms)
             + (f"{'recipe':>10}" if ref else "") + f"{'GRU 60s':>10}{'Wiener 60s':>11}"]  # fmt: skip
    for sid in sessions:
        b = res["baselines"][sid]
        lines.append(f"{sid:<22}" + "".join(cell(r2.get((a, sid))) for a in arms)
                     + (cell(rr.get(sid)) if ref else "")
                     + f"{b['gru']:>10.3f}{b['wiener']:>11.3f}")  # fmt: skip
    m = res["summary"]
    lines.append(f"{'mean (scored ones)':<22}" + "".join(cell(m[a]["mean"]) for a in arms)
                 + (cell(ref["mean"]) if ref else "")
                 + f"{m['gru_mean']:>10.3f}{m['wiener_mean']:>11.3f}")  # fmt: skip
    if m.get("common_sessions") and len(m["common_sessions"]) < len(sessions):
        rc = [r["r2"] for r in ref["rows"] if r["session"] in m["common_sessions"]] if ref else []
        lines.append(f"{'mean, scored by all':<22}"
                     + "".join(cell(m[a]["mean_common"]) for a in arms)
                     + (cell(float(np.mean(rc))) if ref else "")
                     + f"{m['gru_mean_common']:>10.3f}")  # fmt: skip
    lines.append(f"{'sessions scored':<22}" + "".join(f"{m[a]['scored']:>10d}" for a in arms))
    lines.append(f"{'pretraining sessions':<22}"
                 + "".join(f"{a['num_sessions']:>10d}" for a in res["arms"])
                 + (f"{ref['num_sessions']:>10d}" if ref else ""))  # fmt: skip
    b = res["budget"]
    lines.append(f"arms: {b['steps']} steps of {b['batch_size']} each"
                 + (f"; recipe: {ref['model']}, {ref['steps']} steps of {ref['batch_size']}"
                    if ref else ""))  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "poyo-mp-transfer.yaml")
    ap.add_argument("--steps", type=int, default=300, help="training steps, every arm")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step, every arm")
    ap.add_argument("--arms", nargs="+", default=ORDER, choices=list(ARMS))
    ap.add_argument("--sessions", nargs="+", default=EVAL,
                    help="held-out sessions to score; 'held-out': all of the recipe's")  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "scaling")
    ap.add_argument("--train", action="store_true", help="train the missing arms first")
    ap.add_argument("--train-only", action="store_true", help="train the missing arms, stop")
    ap.add_argument("--reference", type=Path, default=None,
                    help="also score this model (the recipe trained in full, e.g. "
                    "models/poyo-mp-transfer) beside the arms")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    args = ap.parse_args(argv)
    if args.plot_only:
        from _plots import plot_only

        plot_only("scaling", args.plot_only)
        return None
    info = run_info()
    cfg_all = arm_config("all", args)
    sessions = cfg_all.data.exclude if args.sessions == ["held-out"] else args.sessions
    train_info = {}
    for arm in args.arms:
        if args.train or args.train_only:
            train_info[arm] = train_arm(arm, args)
        elif trained_steps(args.out / f"arm-{arm}") < args.steps:
            print(f"arm {arm} not trained: .venv/bin/python benchmarks/scaling.py --train-only "
                  f"--arms {arm} --steps {args.steps} --batch {args.batch}")  # fmt: skip
    if args.train_only:
        return None
    done = [a for a in args.arms if trained_steps(args.out / f"arm-{a}") >= args.steps]
    done.sort(key=lambda a: list(ARMS).index(a))
    arms, rows = [], []
    for arm in done:
        folder = args.out / f"arm-{arm}"
        meta = json.loads((folder / "meta.json").read_text())
        pre = meta["info"]["sessions"]
        arms.append({"arm": arm, "num_sessions": len(pre), "sessions": pre,
                     "heads": list(meta["outputs"]), "steps": meta["info"]["steps"],
                     **step_seconds(folder), "model": str(folder),
                     **train_info.get(arm, {})})  # fmt: skip
        rows += evaluate_arm(arm, folder, sessions)
    reference = None
    if args.reference is not None:  # the recipe itself: every session, 3000 steps of 16
        ref_rows = evaluate_arm("recipe", args.reference, sessions)
        vals = [r["r2"] for r in ref_rows if r["r2"] is not None]
        meta = json.loads((args.reference / "meta.json").read_text())
        reference = {"model": str(args.reference), "num_sessions": len(meta["info"]["sessions"]),
                     "steps": meta["info"].get("steps"),
                     "batch_size": meta["info"]["train_config"]["sampler"]["batch_size"],
                     "rows": ref_rows, "mean": float(np.mean(vals)) if vals else None}  # fmt: skip
    base = baselines(sessions)
    summary: dict = {}
    for a in arms:
        vals = [r["r2"] for r in rows if r["arm"] == a["arm"] and r["r2"] is not None]
        summary[a["arm"]] = {"mean": float(np.mean(vals)) if vals else None, "scored": len(vals)}
    # the sessions every arm has a head for: the means on the same sessions
    common = [s for s in sessions if all(r["r2"] is not None for r in rows if r["session"] == s)]
    for a in arms:
        vals = [r["r2"] for r in rows if r["arm"] == a["arm"] and r["session"] in common]
        summary[a["arm"]]["mean_common"] = float(np.mean(vals)) if vals else None
    summary["common_sessions"] = common
    summary["gru_mean_common"] = float(np.mean([base[s]["gru"] for s in common]))
    summary["gru_mean"] = float(np.mean([base[s]["gru"] for s in sessions]))
    summary["wiener_mean"] = float(np.mean([base[s]["wiener"] for s in sessions]))
    res = {
        **info,
        "budget": {"steps": args.steps, "batch_size": args.batch, "recipe": str(args.config),
                   "recipe_steps": 3000, "recipe_batch_size": 16, "threads": 1,
                   "note": "every arm: same model, steps, batch, seed, lr; a small fraction "
                   "of the recipe's 3000 x 16 samples (time on a shared 2-core machine)"},
        "seconds": SECONDS,
        "sessions": sessions,
        "arms": arms,
        "rows": rows,
        "baselines": base,
        "reference": reference,
        "summary": summary,
    }  # fmt: skip
    res["table"] = table(res)
    print("\n".join(res["table"]))
    write_json(args.json, res)
    if args.json is not None:
        args.json.with_suffix(".txt").write_text("\n".join(res["table"]) + "\n")
        from _plots import draw

        draw("scaling", res, args.json)
    return res


if __name__ == "__main__":
    main()
