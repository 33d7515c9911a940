"""What the bucketed encoder (``POYO.encode_rows``) saves in a training step, per session.

A causal training batch pads every latent group of every sequence to the densest group
in it; a few bursts (the binned Spike days) leave most slots padding. ``encode_rows``
encodes groups in buckets of similar width where gradients are taken. This benchmark
draws the calibration sampler's batches (60 s from the start of each session's first
70%, the shipped settings) from every labelled session in ``../shared/data`` and times
one forward + backward of the model on each batch with the bucketed encoder and with one
padded call (the code before), interleaved in one process on one thread. Reported per
session: the share of spike slots that hold a spike (fill) and the median CPU seconds
of a step each way.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/encode_buckets.py \\
        --json benchmarks/results/encode_buckets.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import DATA_DIRS, ROOT, run_info, write_json

from bci_decoder.calibrate import CalibrationSettings, _block_sampler, add_session, plan_for
from bci_decoder.data.nwb import read_nwb
from bci_decoder.data.session import time_split
from bci_decoder.decode import CAUSAL_KEYS, to_torch
from bci_decoder.model.decoder import Decoder
from bci_decoder.model.normalizer import Normalizer
from bci_decoder.model.poyo import POYO


def padded(self: POYO, units, times, mask, row_time, elapsed) -> torch.Tensor:
    """encode_rows as it was: one call, every group padded to the batch's widest."""
    B, R, S = units.shape
    k, v = self.spike_keys(units, times)
    usum = self._unit_sum(units.flatten(0, 1), mask.flatten(0, 1)).unflatten(0, (B, R))
    return self.encode(self.phases(row_time), k, v, mask, usum, elapsed)


def step_cpu(model: POYO, batch: dict) -> float:
    model.zero_grad(set_to_none=True)
    c = time.process_time()
    pred = model(mode="causal", **to_torch(batch, CAUSAL_KEYS))
    (pred**2).mean().backward()
    return time.process_time() - c


def measure(decoder: Decoder, path: Path, batches: int) -> dict | None:
    s = read_nwb(path)
    if not s.behavior:
        return None
    out = s.default_output()
    split = time_split(s)
    span = (split.train[0], min(split.train[0] + 60.0, split.train[1]))
    st = CalibrationSettings()
    beh = s.behavior[out].between(*span)
    if len(beh.timestamps) < 20:
        return None
    dec = add_session(decoder, s, out, Normalizer.fit(beh.data), plan_for(decoder, s, "off", span))
    sampler = _block_sampler(dec, s, out, span, st)
    model = dec.model.train()
    bucketed_fn = POYO.encode_rows
    fill, times = [], {"padded": [], "bucketed": []}
    for i in range(batches):
        _, batch = sampler.batch(i)
        fill.append(float(batch["spike_mask"].mean()))
        for name in ("padded", "bucketed") if i % 2 else ("bucketed", "padded"):
            POYO.encode_rows = padded if name == "padded" else bucketed_fn
            try:
                times[name].append(step_cpu(model, batch))
            finally:
                POYO.encode_rows = bucketed_fn
    p, b = float(np.median(times["padded"])), float(np.median(times["bucketed"]))
    return {
        "session": s.session_id,
        "units": s.num_units,
        "fill": float(np.mean(fill)),
        "padded_cpu_s": p,
        "bucketed_cpu_s": b,
        "speedup": p / b,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "poyo-mp")
    ap.add_argument("--batches", type=int, default=4, help="batches timed per session")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    decoder = Decoder.load(a.model)
    rows = []
    files = sorted(p for d in DATA_DIRS if d.is_dir() for p in d.glob("*.nwb"))
    if not files:
        raise SystemExit(f"no NWB files in {', '.join(map(str, DATA_DIRS))}")
    print(f"{'session':<34} {'units':>5} {'fill':>6} {'padded s':>9} {'bucketed s':>10} {'x':>5}")
    for f in files:
        r = measure(decoder, f, a.batches)
        if r is None:
            continue
        rows.append(r)
        print(f"{r['session']:<34} {r['units']:>5} {r['fill']:>6.1%} {r['padded_cpu_s']:>9.3f} "
              f"{r['bucketed_cpu_s']:>10.3f} {r['speedup']:>5.2f}", flush=True)  # fmt: skip
    p = sum(r["padded_cpu_s"] for r in rows)
    b = sum(r["bucketed_cpu_s"] for r in rows)
    print(f"{'all (sum of medians)':<34} {'':>5} {'':>6} {p:>9.3f} {b:>10.3f} {p / b:>5.2f}")
    write_json(a.json, {**run_info(), "model": str(a.model), "batches": a.batches,
                        "sessions": rows, "total": {"padded_cpu_s": p, "bucketed_cpu_s": b}})  # fmt: skip


if __name__ == "__main__":
    main()
