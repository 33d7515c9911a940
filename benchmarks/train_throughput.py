"""Training throughput on CPU: our POYO vs torch_brain's POYO, same size, same batch.

Both models get the POYO 1.3M hyperparameters (dim 64, depth 6, dim_head 64, 2 cross
heads, 8 self heads, 16 latents per 1/8 s step, 1 s context) and the same batch size, and
train on the same session: a simulated one (100 units at ~20 Hz, 100 Hz hand velocity) or
a real NWB file (``--data``). One training step is

    data prep (each library's own sampler + tokenizer + collate)
    + forward + masked MSE + backward + AdamW step

and every arm is timed in the same process, interleaved: for R rounds, N steps of each
arm in turn (the order rotates every round), so load from other jobs hits all arms alike.

Arms
    torch_brain       torch_brain.models.POYO, 1 s window; its ``tokenize`` (unit start/end
                      tokens, vocabulary lookup, pad8) on a ``Data.slice`` of the session,
                      plus every behaviour sample in the window as an output query.
    ours causal 1s    our default training mode on a 1 s sequence (8 latent groups),
                      matching the reference's window; burn-in 0, up to 24 queries.
    ours causal 3s    the same with our default 3 s sequence (1 s burn-in, 24 queries).
    ours window 1s    POYO as published: 1 s window, one query at its end.

What is counted
    samples/s  training windows (torch_brain, ours window) or sequences (ours causal)
               per second: batch size / median step time.
    targets/s  supervised output queries per second (each a D-dim behaviour vector):
               torch_brain trains every behaviour sample in its 1 s window (100 at
               100 Hz); our causal mode trains up to 24 queries per sequence (after its
               burn-in); window mode trains 1.

Usage
    python benchmarks/train_throughput.py [--batch 32] [--steps 3] [--rounds 3]
        [--threads 2] [--data PATH] [--json OUT] [--profile STEPS]

``--arms`` picks a subset; "ours train mix" is derived (not timed) from the causal 3 s and
window rows with the sampler's default window fraction. With the defaults a run takes
~10-15 min on 2 cores and peaks at ~10 GB (our causal 3 s arm at batch 32). On a shared
machine, ``--threads 1`` gives steadier numbers than 2 threads fighting other jobs.

torch_brain is an optional extra (``pip install -e .[reference]``); without it the script
says so and times only our model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bci_decoder.config import DataConfig, SamplerSettings, TrainConfig  # noqa: E402
from bci_decoder.data.session import Session, time_split  # noqa: E402
from bci_decoder.data.simulate import SimConfig, simulate_session  # noqa: E402
from bci_decoder.decode import CAUSAL_KEYS, WINDOW_KEYS, to_torch  # noqa: E402
from bci_decoder.model.poyo import POYOConfig  # noqa: E402
from bci_decoder.model.vocab import unit_key  # noqa: E402
from bci_decoder.train.data import BatchSampler  # noqa: E402
from bci_decoder.train.loop import build_decoder, masked_mse  # noqa: E402

# The POYO 1.3M configuration, in each library's terms.
DIM, DEPTH, DIM_HEAD, CROSS_HEADS, SELF_HEADS = 64, 6, 64, 2, 8
LATENTS_PER_STEP, LATENT_STEP, WINDOW = 16, 0.125, 1.0
LR, WEIGHT_DECAY = 2e-3, 0.01
MAX_QUERIES = 24  # SamplerSettings default
REF_NAME = "torch_brain"
GOAL = 1.5  # the issue's target: ours at least 1.5x torch_brain's samples/s


# ----------------------------------------------------------------------------- data


def load_session(args: argparse.Namespace) -> Session:
    if args.data is None:
        # ~100 units; the rest rate range is set so the mean rate is ~20 Hz
        cfg = SimConfig(
            seed=args.seed,
            num_sessions=1,
            duration_s=args.duration,
            num_units=args.units,
            baseline_rate_hz=(2.0, 45.0),
        )
        return simulate_session(cfg, 0)
    from bci_decoder.data.nwb import load_sessions

    sessions = load_sessions(args.data)
    if args.session is not None:
        sessions = [s for s in sessions if s.session_id == args.session]
        if not sessions:
            raise SystemExit(f"no session {args.session!r} in {args.data}")
    return sessions[0]


def spikes_per_window(session: Session, span: tuple[float, float]) -> float:
    lo, hi = span
    n = np.searchsorted(session.spike_times, hi) - np.searchsorted(session.spike_times, lo)
    return float(n) / (hi - lo) * WINDOW


# ----------------------------------------------------------------------------- arms


@dataclass
class Arm:
    """One model + optimiser + data pipeline; ``step`` runs one timed training step."""

    name: str
    sample: str  # what one sample is
    model: torch.nn.Module
    prep: Callable[[int], tuple[dict, torch.Tensor, torch.Tensor, int]]
    loss: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor]
    opt: torch.optim.Optimizer = None  # type: ignore[assignment]
    counter: int = 0
    prep_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(self, record: bool = True) -> None:
        self.model.train()
        t0 = time.perf_counter()
        inputs, target, mask, n_targets = self.prep(self.counter)
        t1 = time.perf_counter()
        loss = self.loss(inputs, target, mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        t2 = time.perf_counter()
        self.counter += 1
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss")
        if record:
            self.prep_s.append(t1 - t0)
            self.step_s.append(t2 - t0)
            self.targets.append(n_targets)


def our_arm(session: Session, name: str, mode: str, sequence: float, burn_in: float, args) -> Arm:
    """Our model, fed by our own BatchSampler (tokenize_* + collate_*), as in training."""
    model_cfg = POYOConfig(
        dim=DIM,
        depth=DEPTH,
        dim_head=DIM_HEAD,
        cross_heads=CROSS_HEADS,
        self_heads=SELF_HEADS,
        latents_per_group=LATENTS_PER_STEP,
        latent_step=LATENT_STEP,
        context=WINDOW,
    )
    torch.manual_seed(args.seed)
    tcfg = TrainConfig(model=model_cfg, data=DataConfig(), seed=args.seed)
    decoder, sources = build_decoder(tcfg, [session])
    sampler = BatchSampler(
        sources,
        model_cfg.latent_step,
        model_cfg.context,
        SamplerSettings(
            batch_size=args.batch,
            sequence=sequence,
            burn_in=burn_in,
            max_queries=MAX_QUERIES,
            unit_dropout=0.0,  # the reference gets no unit dropout either
        ),
        seed=args.seed,
        modes=(mode,),
    )
    keys = CAUSAL_KEYS if mode == "causal" else WINDOW_KEYS
    model = decoder.model

    def prep(i: int):
        _, batch = sampler.batch(i)
        inputs = to_torch(batch, keys)
        target = torch.from_numpy(batch["target"])
        mask = torch.from_numpy(batch["target_mask"])
        return inputs, target, mask, int(batch["target_mask"].any(-1).sum())

    def loss(inputs, target, mask):
        return masked_mse(model(mode=mode, **inputs), target, mask)

    sample = (
        f"{sequence:g} s sequence, <={MAX_QUERIES} q after {burn_in:g} s burn-in"
        if mode == "causal"
        else f"{WINDOW:g} s window, 1 q"
    )
    return Arm(name, sample, model, prep, loss)


def reference_available() -> tuple[bool, str]:
    try:
        import torch_brain  # noqa: F401
        from torch_brain.models import POYO  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"{type(e).__name__}: {e}"
    from importlib.metadata import version

    try:
        return True, version("torch_brain")
    except Exception:
        return True, "unknown"


def reference_arm(session: Session, args) -> Arm:
    """torch_brain's POYO fed by its own pipeline: Data.slice -> POYO.tokenize -> collate."""
    from torch_brain.batching import collate, pad8, track_mask8
    from torch_brain.data import ArrayDict, Data, Interval, IrregularTimeSeries
    from torch_brain.models import POYO as RefPOYO

    output = session.default_output()
    beh = session.behavior[output]
    span = time_split(session).train  # same training span as our sampler
    fit = beh.between(*span).data
    mean, std = fit.mean(0), fit.std(0) + 1e-6  # z-scored targets, as ours

    torch.manual_seed(args.seed)
    model = RefPOYO(
        sequence_length=WINDOW,
        latent_step=LATENT_STEP,
        num_latents_per_step=LATENTS_PER_STEP,
        dim_out=beh.dim,
        dim=DIM,
        depth=DEPTH,
        dim_head=DIM_HEAD,
        cross_heads=CROSS_HEADS,
        self_heads=SELF_HEADS,
    )  # dropouts: the class defaults (ffn 0.2, lin 0.4, attention 0)
    unit_ids = [unit_key(session.session_id, u) for u in session.unit_ids]
    model.unit_emb.initialize_vocab(unit_ids)
    model.session_emb.initialize_vocab([session.session_id])

    domain = Interval(start=np.array([span[0]]), end=np.array([span[1]]))
    data = Data(
        spikes=IrregularTimeSeries(
            timestamps=session.spike_times,
            unit_index=session.spike_units.astype(np.int64),
            domain=domain,
        ),
        behavior=IrregularTimeSeries(
            timestamps=beh.timestamps,
            value=((beh.data - mean) / std).astype(np.float32),
            domain=domain,
        ),
        units=ArrayDict(id=np.array(unit_ids)),
        session=Data(id=session.session_id),
        domain=domain,
    )
    lo, hi = span

    def prep(i: int):
        samples = []
        for j in range(args.batch):
            rng = np.random.default_rng([args.seed, i, j, 11])
            t0 = float(rng.uniform(lo, hi - WINDOW))
            win = data.slice(t0, t0 + WINDOW)  # times relative to t0
            tok = model.tokenize(win)
            tok["output_timestamps"] = pad8(win.behavior.timestamps)
            tok["output_mask"] = track_mask8(win.behavior.timestamps)
            tok["target_values"] = pad8(win.behavior.value)
            samples.append(tok)
        batch = collate(samples)
        target = batch.pop("target_values")
        mask = batch["output_mask"]
        return batch, target, mask, int(mask.sum())

    def loss(inputs, target, mask):
        pred = model(**inputs)
        return torch.nn.functional.mse_loss(pred[mask], target[mask])

    return Arm(REF_NAME, f"{WINDOW:g} s window, every behaviour sample", model, prep, loss)


# ----------------------------------------------------------------------------- stats


def num_params(model: torch.nn.Module) -> tuple[int, int]:
    """All parameters, and those outside the unit/session embedding tables."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("unit_emb", "session_emb"))
    )
    return total, total - emb


def summarise(arm: Arm, batch: int) -> dict:
    step = np.asarray(arm.step_s)
    prep = np.asarray(arm.prep_s)
    tgt = np.asarray(arm.targets, dtype=np.float64)
    med = float(np.median(step))
    total, body = num_params(arm.model)
    return {
        "arm": arm.name,
        "sample": arm.sample,
        "steps": int(step.size),
        "params": total,
        "params_non_embedding": body,
        "targets_per_sample": float(tgt.mean() / batch),
        "prep_ms_median": 1e3 * float(np.median(prep)),
        "compute_ms_median": 1e3 * float(np.median(step - prep)),
        "step_ms_median": 1e3 * med,
        "step_ms_p99": 1e3 * float(np.percentile(step, 99)),
        "step_ms_mean": 1e3 * float(step.mean()),
        "samples_per_s": batch / med,
        "targets_per_s": float(tgt.mean()) / med,
        "samples_per_s_mean": batch * step.size / float(step.sum()),
        "targets_per_s_mean": float(tgt.sum()) / float(step.sum()),
    }


def train_mix(rows: dict[str, dict], batch: int, window_fraction: float) -> dict | None:
    """Our default training mix (SamplerSettings.window_fraction of window batches, the rest
    causal 3 s), derived from the two measured rows."""
    c, w = rows.get("ours causal 3s"), rows.get("ours window 1s")
    if c is None or w is None:
        return None
    f = window_fraction
    step = (1 - f) * c["step_ms_median"] + f * w["step_ms_median"]
    tps = (1 - f) * c["targets_per_sample"] + f * w["targets_per_sample"]
    return {
        "arm": "ours train mix",
        "sample": f"derived: {1 - f:.0%} causal 3s + {f:.0%} window",
        "targets_per_sample": tps,
        "step_ms_median": step,
        "samples_per_s": batch / (step / 1e3),
        "targets_per_s": batch * tps / (step / 1e3),
        "derived": True,
    }


def table(rows: list[dict], ref: dict | None) -> str:
    head = (
        f"{'arm':<16} {'targets/':>8} {'prep ms':>8} {'step ms':>8} {'p99 ms':>8} "
        f"{'samples/s':>10} {'targets/s':>10} {'x samples':>10} {'x targets':>10}"
    )
    sub = f"{'':<16} {'sample':>8} {'median':>8} {'median':>8}"
    lines = [head, sub, "-" * len(head)]
    for r in rows:

        def fmt(key: str, spec: str, r=r) -> str:
            return format(r[key], spec) if key in r else "-"

        xs = xt = "-"
        if ref is not None:
            xs = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x"
            xt = f"{r['targets_per_s'] / ref['targets_per_s']:.2f}x"
        lines.append(
            f"{r['arm']:<16} {fmt('targets_per_sample', '.1f'):>8} "
            f"{fmt('prep_ms_median', '.1f'):>8} {fmt('step_ms_median', '.1f'):>8} "
            f"{fmt('step_ms_p99', '.1f'):>8} {fmt('samples_per_s', '.1f'):>10} "
            f"{fmt('targets_per_s', '.0f'):>10} {xs:>10} {xt:>10}"
        )
    return "\n".join(lines)


def profile_arm(arm: Arm, steps: int, top: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile

    arm.step(record=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            arm.step(record=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="samples per batch (both models)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--data", type=Path, default=None, help="NWB file or folder (default: simulate)")
    p.add_argument("--session", default=None, help="session id in --data (default: first)")
    p.add_argument("--units", type=int, default=100, help="simulated units")
    p.add_argument("--duration", type=float, default=120.0, help="simulated seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--arms",
        default="torch_brain,causal1,causal3,window",
        help="comma list of torch_brain, causal1, causal3, window",
    )
    p.add_argument("--json", type=Path, default=None, help="write rows and ratios here")
    p.add_argument(
        "--profile", type=int, default=0, help="after timing, profile N steps of each arm"
    )
    p.add_argument("--plot-only", type=Path, metavar="JSON",
                   help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        from benchmarks._plots import plot_only

        plot_only("train_throughput", args.plot_only)
        return json.loads(args.plot_only.read_text())
    torch.set_num_threads(args.threads)
    wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    load0 = os.getloadavg()

    session = load_session(args)
    span = time_split(session).train
    output = session.default_output()
    beh = session.behavior[output]
    rate = 1.0 / float(np.median(np.diff(beh.timestamps)))
    print(
        f"data: {session.session_id} ({'--data ' + str(args.data) if args.data else 'simulated'})"
        f", {session.num_units} units, "
        f"{spikes_per_window(session, span) / session.num_units:.1f} Hz mean rate, "
        f"{spikes_per_window(session, span):.0f} spikes per 1 s, "
        f"{output} ({beh.dim}-D) at {rate:.0f} Hz, train span {span[1] - span[0]:.0f} s"
    )
    ok, ref_info = reference_available()
    arms: list[Arm] = []
    if REF_NAME in wanted:
        if ok:
            arms.append(reference_arm(session, args))
        else:
            print(
                f"torch_brain is not importable ({ref_info}); timing our model only. "
                f"Install the reference with: pip install -e .[reference]"
            )
    specs = {
        "causal1": ("ours causal 1s", "causal", 1.0, 0.0),
        "causal3": ("ours causal 3s", "causal", 3.0, SamplerSettings().burn_in),
        "window": ("ours window 1s", "window", WINDOW, 0.0),
    }
    for key, (name, mode, seq, burn) in specs.items():
        if key in wanted:
            arms.append(our_arm(session, name, mode, seq, burn, args))
    if not arms:
        raise SystemExit("no arms to time")

    print(
        f"torch {torch.__version__}, torch_brain {ref_info if ok else 'not installed'}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(
        f"batch {args.batch}, {args.rounds} rounds x {args.steps} steps per arm (+{args.warmup} warm-up)"
    )
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    for arm in arms:
        total, body = num_params(arm.model)
        print(
            f"  {arm.name:<16} {total:>9,} params ({body:,} outside unit/session tables): {arm.sample}"
        )

    for arm in arms:
        for _ in range(args.warmup):
            arm.step(record=False)
    t_start = time.perf_counter()
    for r in range(args.rounds):
        k = r % len(arms)
        for arm in arms[k:] + arms[:k]:  # rotate the order each round
            for _ in range(args.steps):
                arm.step()
        print(
            f"  round {r + 1}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
    load1 = os.getloadavg()

    rows = {arm.name: summarise(arm, args.batch) for arm in arms}
    mix = train_mix(rows, args.batch, SamplerSettings().window_fraction)
    ordered = list(rows.values()) + ([mix] if mix else [])
    ref = rows.get(REF_NAME)
    print()
    print(table(ordered, ref))
    print(
        "samples = training windows/sequences; targets = supervised output queries "
        "(each one behaviour vector); rates use median step times; "
        "x = ours / torch_brain"
    )
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    ratios = {}
    if ref is not None:
        for r in ordered:
            if r["arm"] != REF_NAME:
                ratios[r["arm"]] = {
                    "samples": r["samples_per_s"] / ref["samples_per_s"],
                    "targets": r["targets_per_s"] / ref["targets_per_s"],
                }
        parts = ", ".join(f"{k[5:]} {v['samples']:.2f}x" for k, v in ratios.items())
        met = [k for k, v in ratios.items() if v["samples"] >= GOAL]
        print(
            f"ratio ours / torch_brain, samples/s: {parts}; goal >= {GOAL:g}x: "
            + (f"met by {', '.join(met)}" if met else "not met")
        )
        parts = ", ".join(f"{k[5:]} {v['targets']:.2f}x" for k, v in ratios.items())
        print(f"ratio ours / torch_brain, targets/s: {parts}")

    if args.profile > 0:
        for arm in arms:
            print(f"\nprofile: {arm.name}, {args.profile} steps, top 10 by self CPU time")
            print(profile_arm(arm, args.profile))

    result = {
        "config": {
            "batch": args.batch,
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "data": str(args.data) if args.data else "simulated",
            "session": session.session_id,
            "units": session.num_units,
            "torch": torch.__version__,
            "torch_brain": ref_info if ok else None,
            "load_average_start": list(load0),
            "load_average_end": list(load1),
        },
        "rows": ordered,
        "ratio": ratios,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
        from benchmarks._plots import draw

        draw("train_throughput", result, args.json)
    return result


if __name__ == "__main__":
    main()
