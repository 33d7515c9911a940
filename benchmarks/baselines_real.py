"""Score the Wiener, Kalman and GRU baselines on every real session.

Split: ``time_split(session)``; fit on the first 70% (the GRU stops early on its last
10%), test on the last 30%. Features are strictly causal (spikes <= t), so figures sit a
little under the data README's references, which used the full bin around t.

    python benchmarks/baselines_real.py [--data DIR] [--which wiener,kalman,gru] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bci_decoder.baselines import BASELINES, evaluate_baselines  # noqa: E402
from bci_decoder.data.nwb import read_nwb  # noqa: E402
from bci_decoder.data.session import time_split  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "real"

# Test R² from the data README (full current bin, i.e. slightly acausal features).
REFERENCE: dict[str, dict[str, float]] = {
    "wiener": {
        "stevenson2011_m1": 0.761,
        "millerlab_s1_area2": 0.659,
        "jango_20160626_wfiso": 0.710,
        "jango_20160711_wfiso": 0.653,
        "chewie_20131003_co": 0.616,
        "chewie_20131219_co": 0.796,
        "mihi_20140303_co": 0.809,
    },
    "gru": {
        "stevenson2011_m1": 0.882,
        "millerlab_s1_area2": 0.778,
        "jango_20160626_wfiso": 0.966,
        "jango_20160711_wfiso": 0.957,
        "chewie_20131003_co": 0.671,
        "chewie_20131219_co": 0.735,
        "mihi_20140303_co": 0.827,
    },
}
ORDER = list(REFERENCE["wiener"])


def run(data: Path, which: tuple[str, ...], seed: int) -> list[dict]:
    """One row per session: output name, sizes, and R²/fit seconds per baseline."""
    files = sorted(
        data.glob("*.nwb"),
        key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem),
    )
    if not files:
        raise SystemExit(f"no .nwb files in {data}")
    rows = []
    for path in files:
        session = read_nwb(path)
        output = session.default_output()
        split = time_split(session)
        t0 = time.perf_counter()
        res = evaluate_baselines(session, output, split.fit, split.test, which=which, seed=seed)
        row = {
            "session": path.stem,
            "output": output,
            "units": session.num_units,
            "bin_width": res["bin_width"],
            "test_samples": len(res["timestamps"]),
            "total_s": time.perf_counter() - t0,
        }
        for name in which:
            row[name] = {k: v for k, v in res[name].items() if k != "pred"}
        rows.append(row)
        print(f"  {path.stem}: " + "  ".join(f"{n} {res[n]['r2']:.3f}" for n in which), flush=True)
    return rows


def table(rows: list[dict], which: tuple[str, ...]) -> str:
    """Markdown table of R² (reference in brackets) and fit seconds, with the means."""
    head = ["session", "out"] + [f"{n} R² (ref)" for n in which] + [f"{n} fit s" for n in which]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def r2_cell(name: str, session: str, r2: float) -> str:
        ref = REFERENCE.get(name, {}).get(session)
        return f"{r2:.3f}" + (f" ({ref:.3f})" if ref is not None else "")

    for row in rows:
        cells = [row["session"], row["output"]]
        cells += [r2_cell(n, row["session"], row[n]["r2"]) for n in which]
        cells += [f"{row[n]['fit_s']:.1f}" for n in which]
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["**mean**", ""]
    for n in which:
        m = sum(r[n]["r2"] for r in rows) / len(rows)
        refs = [REFERENCE.get(n, {}).get(r["session"]) for r in rows]
        ref = f" ({sum(refs) / len(refs):.3f})" if all(x is not None for x in refs) else ""
        mean.append(f"**{m:.3f}**{ref}")
    mean += [f"{sum(r[n]['fit_s'] for r in rows) / len(rows):.1f}" for n in which]
    lines.append("| " + " | ".join(mean) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of .nwb files")
    ap.add_argument("--which", default=",".join(BASELINES), help="comma-separated baselines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    which = tuple(w.strip() for w in args.which.split(",") if w.strip())
    rows = run(args.data, which, args.seed)
    print(table(rows, which))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
