"""Multi-session pretraining vs training on one session alone, same recipe.

For each session, a model with the shipped model's architecture and optimiser is trained
on that session's first 70% only, for ``--steps`` steps; its causal test R² (last 30%)
is put next to the multi-session model's on the same session.

    .venv/bin/python benchmarks/multi_vs_single.py --multi models/poyo-mp-small \
        --sessions stevenson2011_m1 millerlab_s1_area2 --steps 400 --json out/multi_vs_single.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bci_decoder.config import load_train_config
from bci_decoder.data.session import time_split
from bci_decoder.decode import decode_session
from bci_decoder.metrics import r2_score
from bci_decoder.train.checkpoint import Decoder
from bci_decoder.train.loop import gather_sessions, train

ROOT = Path(__file__).resolve().parents[1]


def test_r2(dec: Decoder, session) -> float:
    split = time_split(session)
    _, target, pred = decode_session(dec, session, session.default_output(), split.test, "causal")
    return r2_score(target, pred)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--multi", type=Path, default=ROOT / "models" / "poyo-mp-small")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "poyo-mp-small.yaml")
    ap.add_argument("--sessions", nargs="+", default=["stevenson2011_m1", "millerlab_s1_area2"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "single")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    args = ap.parse_args()
    if args.plot_only:
        from _plots import plot_only

        plot_only("multi_vs_single", args.plot_only)
        return

    multi = Decoder.load(args.multi)
    rows = []
    for sid in args.sessions:
        cfg = load_train_config(
            args.config,
            {
                "data.include": [sid],
                "data.simulate": None,
                "optim.steps": args.steps,
                "eval_every": args.steps,
                "out": str(args.out / sid),
            },
        )
        session = gather_sessions(cfg)[0]
        t0 = time.perf_counter()
        single = train(cfg, progress=False)
        row = {
            "session": sid,
            "single_r2": test_r2(single, session),
            "single_steps": args.steps,
            "single_train_s": time.perf_counter() - t0,
            "multi_r2": test_r2(multi, session),
            "multi_steps": multi.info.get("steps"),
        }
        rows.append(row)
        print(json.dumps(row))
    print(f"\n{'session':<24}{'single':>10}{'multi':>10}")
    for r in rows:
        print(f"{r['session']:<24}{r['single_r2']:>10.3f}{r['multi_r2']:>10.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
        from _plots import draw

        draw("multi_vs_single", {"rows": rows}, args.json)


if __name__ == "__main__":
    main()
