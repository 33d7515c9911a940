"""Per-step decode latency: our streaming engine (causal cached, window) vs full forwards.

Side by side in one run, on the same simulated stream (N units at 20 Hz, 1 s context),
for a model size (``--config``; both by default):
  shipped    the size of models/poyo-mp-small (dim 64, depth 3, 4 latents per 50 ms)
  poyo-1.3m  torch_brain's POYO 1.3M size (dim 64, depth 6, 16 latents per 125 ms)
and four implementations of one decode at time t:
  torch_brain  torch_brain's POYO of the same size, eager forward of the 1 s window ending
               at t (its own slice + tokenize + collate each step; optional extra,
               skipped with a message if not installed)
  torch_full   our model's full torch forward of the same window (window mode)
  window       our StreamingEngine, window mode, ONNX Runtime (cached spike keys)
  causal       our StreamingEngine, causal mode, ONNX Runtime (cached latent groups)
An engine step's time includes pushing the spikes that arrived since the previous step.
Rows hold wall-clock percentiles (the latency) and the thread's CPU time per step (the
cost without competition for the core; on a shared machine wall time also holds waits).
The implementations run interleaved, in ``--rounds`` rounds over consecutive stretches of
the stream, so a change in machine load hits them alike. One thread each (``--threads``).

    .venv/bin/python benchmarks/engine_latency.py --units 100 --hops 10 --json out/engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bci_decoder.config import TrainConfig  # noqa: E402
from bci_decoder.data.session import Behavior, Session  # noqa: E402
from bci_decoder.decode import WINDOW_KEYS, to_torch  # noqa: E402
from bci_decoder.export.onnx_export import export_step  # noqa: E402
from bci_decoder.model.poyo import POYOConfig  # noqa: E402
from bci_decoder.runtime.engine import StreamingEngine  # noqa: E402
from bci_decoder.tokenizer import collate_window, tokenize_window  # noqa: E402
from bci_decoder.train.loop import build_decoder  # noqa: E402

CONFIGS = {
    "shipped": POYOConfig(
        **json.loads((ROOT / "models" / "poyo-mp-small" / "meta.json").read_text())["config"]
    ),
    "poyo-1.3m": POYOConfig(
        dim=64, depth=6, dim_head=64, cross_heads=2, self_heads=8,
        latents_per_group=16, latent_step=0.125, context=1.0,
    ),
}  # fmt: skip
RATE_HZ = 20.0
IMPLS = ("torch_brain", "torch_full", "window", "causal")


def stream(units: int, seconds: float, seed: int = 0) -> Session:
    rng = np.random.default_rng(seed)
    n = rng.poisson(RATE_HZ * seconds * units)
    t = np.sort(rng.uniform(0, seconds, n))
    ts = np.arange(0.005, seconds, 0.01)
    return Session(
        session_id=f"bench{units}", subject="sim", spike_times=t,
        spike_units=rng.integers(0, units, n), unit_ids=[f"u{i}" for i in range(units)],
        brain_areas=["M1"] * units,
        behavior={"hand_vel": Behavior("hand_vel", ts, rng.normal(size=(len(ts), 2)))},
        domain=(0.0, seconds),
    )  # fmt: skip


def pct(x: list[tuple[float, float]]) -> dict:
    """Wall-clock percentiles (the latency), and the thread's CPU time per step (what
    the step costs when nothing else competes for the core)."""
    a, c = np.asarray(x).T
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "p999_ms": float(np.percentile(a, 99.9)), "steps": len(a),
            "cpu_p50_ms": float(np.percentile(c, 50)),
            "cpu_p99_ms": float(np.percentile(c, 99))}  # fmt: skip


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    return (time.perf_counter() - t0[0]) * 1e3, (time.thread_time() - t0[1]) * 1e3


class EngineTimer:
    """Steps an engine along the stream, a stretch of times at a time."""

    def __init__(self, engine: StreamingEngine, s: Session) -> None:
        self.engine, self.s, self.j = engine, s, 0

    def __call__(self, times: np.ndarray) -> list[float]:
        out, s, eng = [], self.s, self.engine
        for t in times:
            t0 = clock()
            k = np.searchsorted(s.spike_times, t, side="right")
            eng.push(s.spike_times[self.j : k], s.spike_units[self.j : k])
            eng.step(t)
            out.append(since(t0))
            self.j = k
        return out


class TorchFullTimer:
    """Our model's full torch forward of the window ending at t (tokenize included)."""

    def __init__(self, dec, s: Session, config: POYOConfig) -> None:
        self.model, self.s, self.c = dec.model.eval(), s, config
        self.units = dec.units.session_units(s.session_id, s.unit_ids)[s.spike_units]

    @torch.no_grad()
    def __call__(self, times: np.ndarray) -> list[float]:
        out = []
        for t in times:
            t0 = clock()
            w = tokenize_window(
                self.s.spike_times, self.units, float(t), self.c.context, self.c.latent_step
            )
            self.model.forward_window(**to_torch(collate_window([w]), WINDOW_KEYS))
            out.append(since(t0))
        return out


class TorchBrainTimer:
    """torch_brain's POYO of the same size: slice + tokenize + collate + forward."""

    def __init__(self, s: Session, c: POYOConfig) -> None:
        from torch_brain.batching import collate
        from torch_brain.data import ArrayDict, Data, Interval, IrregularTimeSeries
        from torch_brain.models import POYO as RefPOYO

        self.collate, self.c = collate, c
        self.model = RefPOYO(
            sequence_length=c.context, latent_step=c.latent_step,
            num_latents_per_step=c.latents_per_group, dim_out=2, dim=c.dim, depth=c.depth,
            dim_head=c.dim_head, cross_heads=c.cross_heads, self_heads=c.self_heads,
        ).eval()  # fmt: skip
        ids = [f"{s.session_id}/{u}" for u in s.unit_ids]
        self.model.unit_emb.initialize_vocab(ids)
        self.model.session_emb.initialize_vocab([s.session_id])
        domain = Interval(start=np.array([s.domain[0]]), end=np.array([s.domain[1]]))
        self.data = Data(
            spikes=IrregularTimeSeries(
                timestamps=s.spike_times, unit_index=s.spike_units.astype(np.int64),
                domain=domain,
            ),
            units=ArrayDict(id=np.array(ids)), session=Data(id=s.session_id), domain=domain,
        )  # fmt: skip

    @torch.no_grad()
    def __call__(self, times: np.ndarray) -> list[float]:
        out = []
        for t in times:
            t0 = clock()
            win = self.data.slice(float(t) - self.c.context, float(t))
            tok = self.model.tokenize(win)
            tok["output_timestamps"] = torch.tensor([self.c.context], dtype=torch.float32)
            self.model(**self.collate([tok]))
            out.append(since(t0))
        return out


def torch_brain_note() -> str | None:
    try:
        import torch_brain.models  # noqa: F401
    except ImportError as e:
        return f"torch_brain not installed ({e}); pip install -e '.[reference]'"
    return None


def run_case(config_name: str, units: int, hops: list[float], args, notes: list[str]) -> list:
    c = CONFIGS[config_name]
    s = stream(units, args.seconds + 3.0)
    torch.manual_seed(0)
    dec, _ = build_decoder(TrainConfig(model=c), [s])
    # buffers with room for 3x the mean rate (a group) and 2x (a window)
    cap = int(2 ** np.ceil(np.log2(3 * RATE_HZ * units * c.latent_step + 64)))
    wcap = int(2 ** np.ceil(np.log2(2 * RATE_HZ * units * c.context + 256)))
    onnx_dir = tempfile.mkdtemp()
    export_step(dec, onnx_dir, capacity=cap, window_capacity=wcap)  # the daemon's path
    note = torch_brain_note()
    if note:
        notes.append(note)
    rows = []
    for hop in hops:
        times = np.arange(2.0, 2.0 + args.seconds, hop / 1e3) + 1e-4
        full_times = times[:: max(1, len(times) // args.full_steps)][: args.full_steps]
        timers = {}
        for impl in args.impls:
            if impl == "torch_brain" and note is None:
                timers[impl] = (TorchBrainTimer(s, c), full_times)
            elif impl == "torch_full":
                timers[impl] = (TorchFullTimer(dec, s, c), full_times)
            elif impl in ("window", "causal"):
                eng = StreamingEngine(
                    dec, s.session_id, mode=impl, backend="onnx", onnx_path=onnx_dir,
                    max_spikes_per_group=cap, max_spikes_per_window=wcap,
                    intra_op_threads=args.threads,
                )  # fmt: skip
                timers[impl] = (EngineTimer(eng, s), times)
        ms = {impl: [] for impl in timers}
        for r in range(args.rounds):  # interleaved: each round, every impl, next stretch
            for impl, (timer, ts) in timers.items():
                part = np.array_split(ts, args.rounds)[r]
                ms[impl] += timer(part)
        for impl in timers:
            row = {"impl": impl, "units": units, "hop_ms": hop, **pct(ms[impl])}
            rows.append({**row, "config": config_name})
            print(
                f"{config_name:<10}{impl:<12}{units:>6}{hop:>6g}  p50 {row['p50_ms']:8.3f}  "
                f"p99 {row['p99_ms']:8.3f}  p99.9 {row['p999_ms']:8.3f} ms  "
                f"(cpu p50 {row['cpu_p50_ms']:7.3f}, {row['steps']} steps)",
                flush=True,
            )
    return rows


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """torch_brain's p50 (and p99) over each implementation's, per config/units/hop."""
    out = {}
    for r in rows:
        ref = [
            x
            for x in rows
            if x["impl"] == "torch_brain"
            and (x["config"], x["units"], x["hop_ms"]) == (r["config"], r["units"], r["hop_ms"])
        ]
        if ref and r["impl"] != "torch_brain":
            key = f"{r['config']}/{r['impl']}@{r['units']}u/{r['hop_ms']:g}ms"
            out[key] = {
                "p50": ref[0]["p50_ms"] / r["p50_ms"],
                "p99": ref[0]["p99_ms"] / r["p99_ms"],
                "cpu_p50": ref[0]["cpu_p50_ms"] / r["cpu_p50_ms"],
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--units", type=int, nargs="+", default=[50, 100, 200, 500, 1000])
    ap.add_argument("--hops", type=float, nargs="+", default=[1, 10], help="ms between steps")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument(
        "--seconds", type=float, default=6.0, help="stream seconds timed (after 2 s warm-up)"
    )
    ap.add_argument("--full-steps", type=int, default=150, help="steps timed for the full forwards")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    args = ap.parse_args(argv)
    if args.plot_only:
        from benchmarks._plots import plot_only

        return plot_only("engine_latency", args.plot_only)
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    load_before = os.getloadavg()
    for config_name in args.config:
        for n in args.units:
            rows += run_case(config_name, n, args.hops, args, notes)
    for note in sorted(set(notes)):
        print(note)
    rat = ratios(rows)
    for k, v in rat.items():
        print(
            f"torch_brain / {k}: p50 {v['p50']:.1f}x, p99 {v['p99']:.1f}x, "
            f"cpu p50 {v['cpu_p50']:.1f}x"
        )
    result = {
        "rows": rows,
        "speedup_vs_torch_brain": rat,
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(f"load average before {load_before}, after {result['load_average_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        from benchmarks._plots import draw

        draw("engine_latency", result, args.json)
    return result


if __name__ == "__main__":
    main()
