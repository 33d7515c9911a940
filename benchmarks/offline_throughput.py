"""Offline decoding throughput: a simulated 1-hour session decoded at a 10 ms hop through
the streaming engine (``decode.decode_stream``, the path ``evaluate`` uses in causal mode:
the same ONNX graphs, unit tables and state as live decoding), side by side with the
torch reference (``decode.decode_causal``, chunks of 40 groups) on a slice of the same
session, extrapolated to the hour. The slice also checks that both agree. The engine
decodes the hour once per ``--workers`` count (1: one thread; 2: the recording cut in two,
a twin engine on the first half in a thread, ``runtime/offline.py``), and the rows say
how far the two-worker output is from the one-worker output.

    .venv/bin/python benchmarks/offline_throughput.py --json out/offline.json
    .venv/bin/python benchmarks/offline_throughput.py --minutes 5 --units 100   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from engine_latency import CONFIGS, stream  # noqa: E402

from bci_decoder.config import TrainConfig  # noqa: E402
from bci_decoder.decode import decode_causal, session_tokens, stream_start  # noqa: E402
from bci_decoder.export.onnx_export import in_memory_package  # noqa: E402
from bci_decoder.runtime.engine import StreamingEngine, UnitTables  # noqa: E402
from bci_decoder.train.loop import build_decoder  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", choices=list(CONFIGS), default="shipped")
    ap.add_argument("--minutes", type=float, default=60.0, help="session length decoded")
    ap.add_argument("--units", type=int, default=100, help="units at 20 Hz")
    ap.add_argument("--hop-ms", type=float, default=10.0)
    ap.add_argument("--torch-seconds", type=float, default=60.0, help="slice for the reference")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (engine, torch)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="engine decodes, one per worker count (offline.py's split)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    args = ap.parse_args(argv)
    if args.plot_only:
        from benchmarks._plots import plot_only

        return plot_only("offline_throughput", args.plot_only)
    torch.set_num_threads(args.threads)
    seconds = args.minutes * 60.0
    s = stream(args.units, seconds + 1.0)
    torch.manual_seed(0)
    dec, _ = build_decoder(TrainConfig(model=CONFIGS[args.config]), [s])
    q = np.arange(1.0, 1.0 + seconds, args.hop_ms / 1e3) + 1e-4  # the queries decoded
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    in_memory_package(dec)  # the one-off export, timed apart (cached per graph weights)
    export_s = time.perf_counter() - t0

    # decode.decode_stream's engine (session unit order, 3 s burn-in), with workers given
    engine = StreamingEngine(dec, s.session_id, "hand_vel", intra_op_threads=args.threads)
    engine.set_units(UnitTables.from_decoder(dec, s.session_id, "hand_vel", list(s.unit_ids)))
    start = stream_start(q[0], 3.0, dec.config.latent_step)
    engine_s, outs = {}, {}
    for w in args.workers:
        t0 = time.perf_counter()
        outs[w] = engine.decode(
            s.spike_times, s.spike_units, q, start=start, normalised=True, workers=w
        )
        engine_s[w] = time.perf_counter() - t0
    z = outs[args.workers[0]]

    qs = q[q < q[0] + args.torch_seconds]  # the reference on a slice
    times, units, sidx = session_tokens(dec, s)
    t0 = time.perf_counter()
    ref = decode_causal(dec, times, units, sidx, "hand_vel", qs)
    torch_s = time.perf_counter() - t0
    err = float(np.abs(z[: qs.size] - ref).max() / ref.std())

    rows = [
        {
            "impl": "engine" if w == 1 else f"engine_{w}workers",
            "workers": w,
            "seconds_decoded": seconds,
            "queries": int(q.size),
            "wall_s": engine_s[w],
            "hour_s": engine_s[w] * 3600.0 / seconds,
            "max_diff_vs_first_over_std": float(np.abs(outs[w] - z).max() / z.std()),
        }
        for w in args.workers
    ] + [
        {
            "impl": "torch_chunked",
            "seconds_decoded": float(qs[-1] - qs[0]),
            "queries": int(qs.size),
            "wall_s": torch_s,
            "hour_s": torch_s * 3600.0 / float(qs[-1] - qs[0] + args.hop_ms / 1e3),
        },
    ]
    for r in rows:
        r["queries_per_s"] = r["queries"] / r["wall_s"]
        r["x_realtime"] = r["seconds_decoded"] / r["wall_s"]
    print(
        f"{args.config} model, {args.units} units at 20 Hz ({s.spike_times.size:,} spikes), "
        f"hop {args.hop_ms:g} ms; ONNX export (once per model) {export_s:.1f} s"
    )
    print(f"{'impl':<15}{'decoded s':>10}{'queries':>10}{'wall s':>9}{'1 h would take':>16}"
          f"{'queries/s':>11}{'x realtime':>11}")  # fmt: skip
    for r in rows:
        print(
            f"{r['impl']:<15}{r['seconds_decoded']:>10.0f}{r['queries']:>10}{r['wall_s']:>9.2f}"
            f"{r['hour_s']:>14.1f} s{r['queries_per_s']:>11.0f}{r['x_realtime']:>11.0f}"
        )
    print(f"engine vs torch on the slice: max |error| = {err:.2e} of the output's std")
    result = {
        "config": args.config,
        "units": args.units,
        "hop_ms": args.hop_ms,
        "spikes": int(s.spike_times.size),
        "export_s": export_s,
        "rows": rows,
        "max_error_over_std": err,
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    print(f"load average before {load_before}, after {result['load_average_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        from benchmarks._plots import draw

        draw("offline_throughput", result, args.json)
    return result


if __name__ == "__main__":
    main()
