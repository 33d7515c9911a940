"""What a session readout adds to a causal push + step: the linear head, a readout of the
features, and a readout of the features and every unit's spike counts, side by side.

Three engines of one model package (ONNX Runtime, one thread each, no torch) decode the
same replayed real session at a fixed hop; their steps are interleaved (one push + step
of each in turn, the order rotated), so the machine's load falls on all three alike. The
readouts' weights are random of the shipped shape (128 units; the cost does not depend
on their values), the counts readout over all of the session's units.

    .venv/bin/python benchmarks/readout_step.py --json benchmarks/results/readout_step.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bci_decoder.data.nwb import read_nwb  # noqa: E402
from bci_decoder.model.package import ModelPackage  # noqa: E402
from bci_decoder.model.session_readout import SessionReadout  # noqa: E402
from bci_decoder.runtime.engine import StreamingEngine  # noqa: E402
from bci_decoder.runtime.unit_tables import UnitTables  # noqa: E402
from benchmarks._common import find_session_file, run_info, write_json  # noqa: E402


def random_readout(features: int, units: int, hidden: int, outputs: int) -> SessionReadout:
    rng = np.random.default_rng(0)
    n = features + units

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    return SessionReadout(
        w(3 * hidden, n), w(3 * hidden, hidden), w(3 * hidden), w(3 * hidden),
        w(outputs, hidden), w(outputs), np.zeros(n, np.float32), np.ones(n, np.float32), units,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "poyo-mp-small")
    ap.add_argument("--session", default="jango_20160626_wfiso")
    ap.add_argument("--hop", type=float, default=0.01, help="seconds between steps")
    ap.add_argument("--seconds", type=float, default=120.0, help="of the session replayed")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    session = read_nwb(find_session_file(args.session))
    pkg = ModelPackage.load(args.model)
    out = session.default_output()
    base = UnitTables.build(pkg, session.session_id, out, list(session.unit_ids))
    D, U, n_out = pkg.dims["D"], base.num_units, base.norm.mean.size
    variants = {
        "linear head": dataclasses.replace(base, readout=None),
        "readout (features)": dataclasses.replace(
            base, readout=random_readout(D, 0, args.hidden, n_out)
        ),
        f"readout (features + {U} units' counts)": dataclasses.replace(
            base, readout=random_readout(D, U, args.hidden, n_out)
        ),
    }
    engines = {
        name: StreamingEngine(pkg, session.session_id, out, tables=tab)
        for name, tab in variants.items()
    }
    t0 = session.domain[0] + 5.0
    steps = t0 + args.hop * np.arange(1, int(args.seconds / args.hop) + 1)
    t_sp, u_sp = session.spike_times, session.spike_units
    edges = np.searchsorted(t_sp, np.concatenate([[t0], steps]), side="right")
    for e in engines.values():
        e.reset(t0)  # from the group of t0; the spikes after t0 come in step by step
    lat = {name: np.zeros(steps.size) for name in engines}
    names = list(engines)
    for i, t in enumerate(steps):
        a, b = edges[i], edges[i + 1]
        for j in range(len(names)):
            name = names[(i + j) % len(names)]  # rotate who goes first
            e = engines[name]
            c0 = time.perf_counter()
            e.push(t_sp[a:b], u_sp[a:b])
            y = e.step(float(t))
            lat[name][i] = (time.perf_counter() - c0) * 1e6
            if not np.isfinite(y).all():
                raise SystemExit(f"{name}: a non-finite output at {t}")
    rows = []
    ref = np.median(lat["linear head"])
    print(f"{args.session}, {U} units, hop {args.hop * 1e3:.0f} ms, {steps.size} steps each")
    print(f"{'push + step (µs)':44s} {'p50':>7s} {'p99':>7s} {'p50 - head':>11s}")
    for name, x in lat.items():
        row = {"variant": name, "p50_us": float(np.median(x)),
               "p99_us": float(np.percentile(x, 99)), "steps": int(x.size)}  # fmt: skip
        row["p50_over_head_us"] = row["p50_us"] - ref
        rows.append(row)
        print(f"{name:44s} {row['p50_us']:7.0f} {row['p99_us']:7.0f} "
              f"{row['p50_over_head_us']:+11.0f}")  # fmt: skip
    write_json(
        args.json,
        {
            "run": run_info(),
            "session": args.session,
            "units": U,
            "hop_s": args.hop,
            "hidden": args.hidden,
            "rows": rows,
        },  # fmt: skip
    )


if __name__ == "__main__":
    main()
