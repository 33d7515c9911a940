"""Pretraining throughput on both CPU cores: one process vs torchrun DDP (gloo).

Runs the real ``bci-decoder train`` path on the corpus pretraining config
(configs/poyo-mp.yaml: 31 real sessions + 3 simulated, batch 16, warm start from
models/poyo-mp-transfer-s2, channel tie) for a few optimizer steps, three ways:

    a  1 proc x 1 thread    python -m bci_decoder.cli train, threads: 1, OMP_NUM_THREADS=1
    b  1 proc x 2 threads   the same with threads: 2 (torch.set_num_threads(2)), OMP=2
    c  2 procs x 1 thread   torchrun --standalone --nproc_per_node 2 -m bci_decoder.cli train,
                            threads: 1, OMP=1; gloo; the same global batch of 16, each rank
                            sampling and training 8 of its samples (BatchSampler.batch:
                            range(rank, batch_size, world)); gradients all-reduced by DDP

Each run gets a temporary YAML derived from the config (optim.steps, out in a temp folder,
threads; eval_seconds near 0 so the end-of-run validation decodes nothing) and trains in
its own subprocess from the repository root, so data paths resolve as in real use. Arms
alternate in rounds (a b c, b c a, c a b, ...) so load from other jobs hits all alike.

What is timed
    s/step  from the run's log.jsonl: rank 0 writes the seconds since the loop started
            (``t``, 10 ms resolution) after each optimizer step (and, under DDP, after the
            loss all-reduce, so it is the global step). One step = sampling + collating this
            rank's share of the batch + forward + loss + backward (+ gradient all-reduce) +
            clip + AdamW. Session loading, model building and warm start happen before the
            loop and are not counted; nor are the first --skip steps (warm-up, and the ranks
            finishing their start-up at different times). The step's batch comes from one
            session chosen by (seed, step), and sessions differ ten-fold in spikes, so step
            times vary with the step; every arm runs the same steps.
    samples/s  batch size / median s/step (and / mean s/step over all timed steps).
    start-up  run wall time minus the logged training time (imports, session loading,
            warm start, process-group set-up, the final save).

Usage (from the repository root; ~10 min with the defaults on an idle 2-core machine)
    .venv/bin/python benchmarks/train_ddp.py [--steps 50] [--rounds 3] [--skip 5]
        [--arms a,b,c] [--config configs/poyo-mp.yaml]
        [--json benchmarks/results/train_ddp.json]

The table goes to stdout and, beside the JSON, to the same name with .txt. Checkpoints
go to a temporary folder that is removed afterwards (--keep keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from benchmarks._common import run_info, write_json  # noqa: E402

BIN = Path(sys.executable).parent
ARMS = {
    "a": {"name": "1 proc x 1 thread", "procs": 1, "threads": 1},
    "b": {"name": "1 proc x 2 threads", "procs": 1, "threads": 2},
    "c": {"name": "2 procs x 1 thread (DDP)", "procs": 2, "threads": 1},
}


def derived_config(base: dict, steps: int, threads: int, out: Path) -> dict:
    cfg = json.loads(json.dumps(base))  # deep copy
    cfg["optim"]["steps"] = steps
    cfg["threads"] = threads
    cfg["out"] = str(out)
    cfg["eval_every"] = 10**9  # validate only after the last step ...
    cfg["eval_seconds"] = 0.01  # ... on too short a tail to decode anything
    return cfg


def command(arm: dict, config: Path) -> list[str]:
    train = ["-m", "bci_decoder.cli", "train", "--config", str(config)]
    if arm["procs"] == 1:
        return [sys.executable, *train]
    torchrun = BIN / "torchrun"
    launcher = (
        [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    return [*launcher, "--standalone", "--nproc_per_node", str(arm["procs"]), *train]


def run_once(key: str, base: dict, args: argparse.Namespace, work: Path, rnd: int) -> dict:
    arm = ARMS[key]
    tag = f"{key}_r{rnd}"
    out = work / tag
    cfg_path = work / f"{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(derived_config(base, args.steps, arm["threads"], out)))
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(arm["threads"])
    cmd = command(arm, cfg_path)
    loads = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    with (work / f"{tag}.out").open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(2.0)
            loads.append(os.getloadavg()[0])
    wall = time.perf_counter() - t0
    log = out / "log.jsonl"
    if proc.returncode != 0 or not log.exists():
        tail = (work / f"{tag}.out").read_text()[-2000:]
        raise SystemExit(f"{tag} failed (rc {proc.returncode}): {' '.join(cmd)}\n{tail}")
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    t = np.array([r["t"] for r in recs])
    dt = np.diff(np.concatenate([[0.0], t]))
    return {
        "arm": key,
        "round": rnd,
        "command": " ".join(cmd),
        "env": {"OMP_NUM_THREADS": env["OMP_NUM_THREADS"]},
        "wall_s": wall,
        "train_s": float(t[-1]),
        "startup_s": wall - float(t[-1]),
        "load_1min": [float(x) for x in loads],
        "steps": [int(r["step"]) for r in recs],
        "step_s": [float(x) for x in dt],
        "loss": [float(r["loss"]) for r in recs],
        "tie_loss": [float(r.get("tie_loss", 0.0)) for r in recs],
    }


def summarise(key: str, runs: list[dict], skip: int, batch: int) -> dict:
    mine = [r for r in runs if r["arm"] == key]
    step = np.concatenate([np.asarray(r["step_s"][skip:]) for r in mine])
    med, mean = float(np.median(step)), float(step.mean())
    return {
        "arm": key,
        "name": ARMS[key]["name"],
        "runs": len(mine),
        "steps_timed": int(step.size),
        "s_per_step_median": med,
        "s_per_step_p99": float(np.percentile(step, 99)),
        "s_per_step_mean": mean,
        "samples_per_s": batch / med,
        "samples_per_s_mean": batch / mean,
        "startup_s_median": float(np.median([r["startup_s"] for r in mine])),
        "wall_s_median": float(np.median([r["wall_s"] for r in mine])),
        "load_1min_median": float(np.median(np.concatenate([r["load_1min"] for r in mine]))),
    }


def paired_speedup(runs: list[dict], key: str, ref: str, skip: int) -> float:
    """Median over steps of (ref's time / this arm's time), each step's time the median
    over rounds: the same steps (same sessions) compared with each other."""

    def per_step(k: str) -> np.ndarray:
        return np.median(np.array([r["step_s"][skip:] for r in runs if r["arm"] == k]), axis=0)

    a, x = per_step(ref), per_step(key)
    ok = x > 0
    return float(np.median(a[ok] / x[ok]))


def loss_agreement(runs: list[dict], key: str, ref: str) -> dict:
    """Logged losses of the first round of ``key`` vs ``ref`` at the same steps."""
    r = next(x for x in runs if x["arm"] == ref)
    k = next(x for x in runs if x["arm"] == key)
    a, b = np.array(r["loss"]), np.array(k["loss"])
    d = np.abs(a - b)
    rel = d / np.maximum(np.abs(a), 1e-12)
    return {
        "vs": ref,
        "steps": r["steps"],
        "loss_ref": r["loss"],
        "loss": k["loss"],
        "abs_diff_max": float(d.max()),
        "abs_diff_median": float(np.median(d)),
        "rel_diff_max": float(rel.max()),
        "rel_diff_median": float(np.median(rel)),
        "rel_diff_step0": float(rel[0]),
    }


def table(rows: list[dict], speedups: dict[str, dict]) -> str:
    head = (
        f"{'arm':<28} {'steps':>5} {'median':>8} {'p99':>8} {'mean':>8} {'samples/s':>9} "
        f"{'x vs a':>7} {'x vs a':>7} {'x paired':>8} {'start-up':>8} {'load':>5}"
    )
    sub = (
        f"{'':<28} {'':>5} {'s/step':>8} {'s/step':>8} {'s/step':>8} {'(median)':>9} "
        f"{'(median)':>7} {'(mean)':>7} {'(steps)':>8} {'s':>8} {'1 min':>5}"
    )
    lines = [head, sub, "-" * len(head)]
    for r in rows:
        sp = speedups[r["arm"]]
        lines.append(
            f"{r['arm'] + ' ' + r['name']:<28} {r['steps_timed']:>5} "
            f"{r['s_per_step_median']:>8.3f} {r['s_per_step_p99']:>8.3f} "
            f"{r['s_per_step_mean']:>8.3f} {r['samples_per_s']:>9.1f} "
            f"{sp['median']:>6.2f}x {sp['mean']:>6.2f}x {sp['paired']:>7.2f}x "
            f"{r['startup_s_median']:>8.1f} {r['load_1min_median']:>5.2f}"
        )
    return "\n".join(lines)


def per_run(runs: list[dict], skip: int) -> str:
    """Each run's timed training seconds, steps over 2 s and median 1-min load, in order."""
    lines = ["per run (in order): arm round, timed seconds, steps > 2 s, median 1-min load"]
    for r in runs:
        s = np.asarray(r["step_s"][skip:])
        lines.append(
            f"  {r['arm']} r{r['round'] + 1}  {s.sum():6.1f} s  {int((s > 2).sum()):3d}  "
            f"{np.median(r['load_1min']):.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "poyo-mp.yaml")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every arm once")
    p.add_argument("--skip", type=int, default=5, help="first steps of a run left untimed")
    p.add_argument("--arms", default="a,b,c", help="comma list of a, b, c (a is the reference)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "train_ddp.json")
    p.add_argument("--workdir", type=Path, default=None, help="temp folder (default: mkdtemp)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, models)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    info = run_info()
    keys = [k.strip() for k in args.arms.split(",") if k.strip()]
    if not keys or any(k not in ARMS for k in keys):
        raise SystemExit(f"--arms: a comma list of {', '.join(ARMS)}")
    if args.skip >= args.steps:
        raise SystemExit("--skip must be below --steps")
    base = yaml.safe_load(args.config.read_text())
    batch = int(base["sampler"]["batch_size"])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="train_ddp_"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"config {args.config} (batch {batch}), {args.rounds} rounds x {len(keys)} arms x "
        f"{args.steps} steps (first {args.skip} untimed), temp folder {work}"
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in info['load_average'])}")
    runs: list[dict] = []
    t_start = time.perf_counter()
    try:
        for rnd in range(args.rounds):
            k = rnd % len(keys)
            for key in keys[k:] + keys[:k]:  # rotate the order each round
                r = run_once(key, base, args, work, rnd)
                runs.append(r)
                med = np.median(r["step_s"][args.skip :])
                print(
                    f"  round {rnd + 1} {key} {ARMS[key]['name']:<26} median {med:.3f} s/step, "
                    f"wall {r['wall_s']:.0f} s, start-up {r['startup_s']:.0f} s, "
                    f"load {np.median(r['load_1min']):.2f} "
                    f"({time.perf_counter() - t_start:.0f} s total)",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_end = list(os.getloadavg())
    rows = [summarise(k, runs, args.skip, batch) for k in keys]
    ref = "a" if "a" in keys else keys[0]
    ref_row = next(r for r in rows if r["arm"] == ref)
    speedups = {
        r["arm"]: {
            "median": ref_row["s_per_step_median"] / r["s_per_step_median"],
            "mean": ref_row["s_per_step_mean"] / r["s_per_step_mean"],
            "paired": paired_speedup(runs, r["arm"], ref, args.skip),
        }
        for r in rows
    }
    losses = {k: loss_agreement(runs, k, ref) for k in keys if k != ref}
    # the same arm twice: are the logged losses reproducible run to run?
    repeat = {}
    for k in keys:
        mine = [r for r in runs if r["arm"] == k]
        if len(mine) > 1:
            d = np.abs(np.array(mine[0]["loss"]) - np.array(mine[1]["loss"]))
            repeat[k] = float(d.max())
    best = min(rows, key=lambda r: r["s_per_step_median"])
    best_mean = min(rows, key=lambda r: r["s_per_step_mean"])

    text = [table(rows, speedups), "", per_run(runs, args.skip), ""]
    text.append(
        f"s/step from log.jsonl (rank 0, after each optimizer step), first {args.skip} steps of "
        f"each run left out; samples/s = {batch} / median s/step; x vs a = a's median (mean) "
        f"s/step / this arm's; x paired = median over steps of a's time / this arm's (each "
        f"step's time the median over rounds)"
    )
    text.append(
        f"fastest by median s/step: {best['arm']} {best['name']} "
        f"({speedups[best['arm']]['median']:.2f}x vs {ref}); by mean s/step (total training "
        f"time): {best_mean['arm']} {best_mean['name']} "
        f"({speedups[best_mean['arm']]['mean']:.2f}x vs {ref})"
    )
    for k, la in losses.items():
        text.append(
            f"loss {k} vs {ref} (same {len(la['steps'])} steps, round 1): max |diff| "
            f"{la['abs_diff_max']:.2g}, max relative diff {la['rel_diff_max']:.2g}, "
            f"median {la['rel_diff_median']:.2g}"
        )
    if repeat:
        text.append(
            "same arm, rounds 1 vs 2, max |loss diff|: "
            + ", ".join(f"{k} {v:.2g}" for k, v in repeat.items())
        )
    text.append(
        f"load average (1, 5, 15 min) at start {' '.join(f'{x:.2f}' for x in info['load_average'])}"
        f", at end {' '.join(f'{x:.2f}' for x in load_end)}; {info['cpus']} CPUs"
    )
    text.append(f"commit {info['commit'][:12]}{' (dirty)' if info['dirty'] else ''}")
    text.append(f"command: {info['command']}")
    out = "\n".join(text)
    print()
    print(out)

    result = {
        **info,
        "load_average_end": load_end,
        "config": {
            "config": str(args.config),
            "batch": batch,
            "steps": args.steps,
            "rounds": args.rounds,
            "skip": args.skip,
            "arms": {k: ARMS[k] for k in keys},
            "wall_s": time.perf_counter() - t_start,
        },
        "rows": rows,
        "speedup_vs_" + ref: speedups,
        "fastest_median": best["arm"],
        "fastest_mean": best_mean["arm"],
        "loss_agreement": losses,
        "loss_repeat_max_abs_diff": repeat,
        "runs": runs,
    }
    if args.json is not None:
        write_json(args.json, result)
        txt = args.json.with_suffix(".txt")
        txt.write_text(out + "\n")
        print(f"wrote {txt}")
    return result


if __name__ == "__main__":
    main()
