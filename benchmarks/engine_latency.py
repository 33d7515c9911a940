"""Per-step decode latency: our streaming engine (causal cached, window) vs full forwards.

Side by side in one run, on the same simulated stream (N units at 20 Hz), the POYO 1.3M
size (dim 64, depth 6, 16 latents per 125 ms, 1 s context):
  torch_brain  torch_brain's POYO, eager forward of the 1 s window ending at t (its own
               tokenize + collate each step; optional extra, skipped if not installed)
  torch_full   our model's full torch forward of the same window (window mode)
  window       our StreamingEngine, window mode, ONNX Runtime (cached spike keys)
  causal       our StreamingEngine, causal mode, ONNX Runtime (cached latent groups)
A step's time includes pushing the spikes that arrived since the previous step.

    .venv/bin/python benchmarks/engine_latency.py --units 100 --hops 10 --json out/engine.json
"""

from __future__ import annotations

import argparse
import json
import os
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

CONFIG = POYOConfig(
    dim=64, depth=6, dim_head=64, cross_heads=2, self_heads=8,
    latents_per_group=16, latent_step=0.125, context=1.0,
)  # fmt: skip
RATE_HZ = 20.0


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


def pct(x: list[float]) -> dict:
    a = np.asarray(x)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "p999_ms": float(np.percentile(a, 99.9)), "steps": len(a)}  # fmt: skip


def time_engine(engine: StreamingEngine, s: Session, times: np.ndarray) -> list[float]:
    out, j = [], 0
    for t in times:
        t0 = time.perf_counter()
        k = np.searchsorted(s.spike_times, t, side="right")
        engine.push(s.spike_times[j:k], s.spike_units[j:k])
        engine.step(t)
        out.append((time.perf_counter() - t0) * 1e3)
        j = k
    return out


@torch.no_grad()
def time_torch_full(dec, s: Session, times: np.ndarray) -> list[float]:
    model = dec.model.eval()
    units = dec.units.session_units(s.session_id, s.unit_ids)[s.spike_units]
    out = []
    for t in times:
        t0 = time.perf_counter()
        w = tokenize_window(s.spike_times, units, float(t), CONFIG.context, CONFIG.latent_step)
        model.forward_window(**to_torch(collate_window([w]), WINDOW_KEYS))
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@torch.no_grad()
def time_torch_brain(s: Session, times: np.ndarray) -> list[float] | str:
    try:
        from torch_brain.batching import collate
        from torch_brain.data import ArrayDict, Data, Interval, IrregularTimeSeries
        from torch_brain.models import POYO as RefPOYO
    except ImportError as e:
        return f"torch_brain not installed ({e}); pip install -e '.[reference]'"
    model = RefPOYO(
        sequence_length=CONFIG.context, latent_step=CONFIG.latent_step,
        num_latents_per_step=CONFIG.latents_per_group, dim_out=2, dim=CONFIG.dim,
        depth=CONFIG.depth, dim_head=CONFIG.dim_head, cross_heads=CONFIG.cross_heads,
        self_heads=CONFIG.self_heads,
    ).eval()  # fmt: skip
    ids = [f"{s.session_id}/{u}" for u in s.unit_ids]
    model.unit_emb.initialize_vocab(ids)
    model.session_emb.initialize_vocab([s.session_id])
    domain = Interval(start=np.array([s.domain[0]]), end=np.array([s.domain[1]]))
    data = Data(
        spikes=IrregularTimeSeries(
            timestamps=s.spike_times, unit_index=s.spike_units.astype(np.int64), domain=domain
        ),
        units=ArrayDict(id=np.array(ids)), session=Data(id=s.session_id), domain=domain,
    )  # fmt: skip
    out = []
    for t in times:
        t0 = time.perf_counter()
        win = data.slice(float(t) - CONFIG.context, float(t))
        tok = model.tokenize(win)
        tok["output_timestamps"] = torch.tensor([CONFIG.context], dtype=torch.float32)
        batch = collate([tok])
        model(**batch)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--units", type=int, nargs="+", default=[50, 100, 200, 500, 1000])
    ap.add_argument("--hops", type=float, nargs="+", default=[1, 10], help="ms between steps")
    ap.add_argument(
        "--seconds", type=float, default=6.0, help="stream seconds timed (after 2 s warm-up)"
    )
    ap.add_argument("--full-steps", type=int, default=150, help="steps timed for the full forwards")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    for n in args.units:
        s = stream(n, args.seconds + 3.0)
        torch.manual_seed(0)
        dec, _ = build_decoder(TrainConfig(model=CONFIG), [s])
        cap = int(2 ** np.ceil(np.log2(3 * RATE_HZ * n * CONFIG.latent_step + 64)))
        wcap = int(2 ** np.ceil(np.log2(2 * RATE_HZ * n * CONFIG.context + 256)))
        tmp = tempfile.mkdtemp()
        export_step(dec, tmp, capacity=cap, window_capacity=wcap)
        for hop in args.hops:
            times = np.arange(2.0, 2.0 + args.seconds, hop / 1e3) + 1e-4
            full_times = times[:: max(1, len(times) // args.full_steps)][: args.full_steps]
            for impl in ("torch_brain", "torch_full", "window", "causal"):
                if impl in ("torch_brain", "torch_full"):
                    ms = (
                        time_torch_brain(s, full_times)
                        if impl == "torch_brain"
                        else time_torch_full(dec, s, full_times)
                    )
                    if isinstance(ms, str):
                        notes.append(ms)
                        continue
                else:
                    eng = StreamingEngine(
                        dec, s.session_id, mode=impl, backend="onnx", onnx_path=tmp,
                        max_spikes_per_group=cap, max_spikes_per_window=wcap,
                    )  # fmt: skip
                    ms = time_engine(eng, s, times)
                rows.append({"impl": impl, "units": n, "hop_ms": hop, **pct(ms)})
                r = rows[-1]
                print(
                    f"{impl:<12}{n:>6}{hop:>6g}  p50 {r['p50_ms']:8.3f}  p99 {r['p99_ms']:8.3f}  p99.9 {r['p999_ms']:8.3f} ms  ({r['steps']} steps)",
                    flush=True,
                )
    for note in sorted(set(notes)):
        print(note)
    ratios = {}
    for r in rows:
        ref = [
            x
            for x in rows
            if x["impl"] == "torch_brain"
            and x["units"] == r["units"]
            and x["hop_ms"] == r["hop_ms"]
        ]
        if ref and r["impl"] != "torch_brain":
            ratios[f"{r['impl']}@{r['units']}u/{r['hop_ms']:g}ms"] = ref[0]["p50_ms"] / r["p50_ms"]
    for k, v in ratios.items():
        print(f"torch_brain p50 / {k} p50 = {v:.1f}x")
    result = {"rows": rows, "speedup_vs_torch_brain_p50": ratios, "threads": args.threads,
              "load_average": os.getloadavg()}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
