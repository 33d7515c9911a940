"""Score the Wiener, Kalman and GRU baselines on every real session.

Split: ``time_split(session)``; fit on the first 70% (the GRU stops early on its last
10%), or with ``--fit-seconds S`` on its first S seconds only (the "GRU(60 s)" few-shot
calibration is compared with), and test on the last 30%. Features are strictly causal
(spikes <= t). The GRU's reference is issue 8's GRU on the same strict split; Wiener's is
the data README's (full bin around t, so slightly acausal). ``--with-previous`` adds the
GRU at its pre-tuning defaults (one model, input dropout 0.3) side by side.

    nice -n 10 python benchmarks/baselines_real.py --json benchmarks/results/baselines_real.json
    nice -n 10 python benchmarks/baselines_real.py --fit-seconds 60 --with-previous \
        --json benchmarks/results/baselines_real_60s.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bci_decoder.baselines import BASELINES, evaluate_baselines  # noqa: E402
from bci_decoder.data.nwb import read_nwb  # noqa: E402
from bci_decoder.data.session import time_split  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "real"

# Test R² on the last 30%: Wiener from the data README (full current bin, slightly
# acausal); GRU from issue 8's reference GRU on this strict split (spikes <= t).
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
        "stevenson2011_m1": 0.854,
        "millerlab_s1_area2": 0.727,
        "jango_20160626_wfiso": 0.957,
        "jango_20160711_wfiso": 0.952,
        "chewie_20131003_co": 0.533,
        "chewie_20131219_co": 0.608,
        "mihi_20140303_co": 0.744,
    },
}
# The GRU before tuning (one model, input dropout 0.3); see bci_decoder/baselines/gru.py.
PREVIOUS_GRU: dict[str, Any] = {"ensemble": 1, "input_dropout": 0.3}
ORDER = list(REFERENCE["wiener"])


def score_session(
    path: Path,
    which: tuple[str, ...],
    seed: int,
    fit_seconds: float | None = None,
    with_previous: bool = False,
    threads: int = 1,
) -> dict:
    """One session's row: output name, sizes, and R²/fit seconds per baseline."""
    torch.set_num_threads(threads)
    session = read_nwb(path)
    output = session.default_output()
    split = time_split(session)
    fit = split.fit
    if fit_seconds is not None:
        fit = (fit[0], min(fit[0] + fit_seconds, fit[1]))
    t0 = time.perf_counter()
    res = evaluate_baselines(session, output, fit, split.test, which=which, seed=seed)
    if with_previous:
        prev = evaluate_baselines(
            session, output, fit, split.test, ("gru",), seed, {"gru": PREVIOUS_GRU}
        )
        res["gru_previous"] = prev["gru"]
    names = which + (("gru_previous",) if with_previous else ())
    beh_ts = session.behavior[output].timestamps
    row = {
        "session": path.stem,
        "output": output,
        "units": session.num_units,
        "bin_width": res["bin_width"],
        "fit_samples": int(((beh_ts >= fit[0]) & (beh_ts < fit[1])).sum()),
        "test_samples": len(res["timestamps"]),
        "total_s": time.perf_counter() - t0,
    }
    for name in names:
        row[name] = {k: v for k, v in res[name].items() if k != "pred"}
    print(f"  {path.stem}: " + "  ".join(f"{n} {res[n]['r2']:.3f}" for n in names), flush=True)
    return row


def run(
    data: Path,
    which: tuple[str, ...],
    seed: int,
    fit_seconds: float | None = None,
    with_previous: bool = False,
    threads: int = 1,
    jobs: int = 1,
) -> list[dict]:
    """Rows for every session in ``data``, in the reference order. Sessions are
    independent fits with ``threads`` torch threads each, so ``jobs`` processes give the
    same figures as one."""
    files = sorted(
        data.glob("*.nwb"),
        key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem),
    )
    if not files:
        raise SystemExit(f"no .nwb files in {data}")
    args = (which, seed, fit_seconds, with_previous, threads)
    if jobs <= 1:
        return [score_session(path, *args) for path in files]
    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(score_session, path, *args) for path in files]
        return [f.result() for f in futures]


def table(rows: list[dict], names: tuple[str, ...], with_reference: bool = True) -> str:
    """Markdown table of test R² (reference in brackets), the GRU's validation-tail R² and
    fit seconds, with the means."""
    grus = [n for n in names if n.startswith("gru")]
    head = ["session", "out", "fit n"] + [
        f"{n} R²" + (" (ref)" if with_reference else "") for n in names
    ]
    head += [f"{n} valid R²" for n in grus] + [f"{n} fit s" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ref_of(name: str, session: str) -> float | None:
        return REFERENCE.get(name, {}).get(session) if with_reference else None

    def r2_cell(name: str, session: str, r2: float) -> str:
        ref = ref_of(name, session)
        return f"{r2:.3f}" + (f" ({ref:.3f})" if ref is not None else "")

    for row in rows:
        cells = [row["session"], row["output"], str(row["fit_samples"])]
        cells += [r2_cell(n, row["session"], row[n]["r2"]) for n in names]
        cells += [f"{row[n]['valid_r2']:.3f}" for n in grus]
        cells += [f"{row[n]['fit_s']:.1f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["**mean**", "", ""]
    for n in names:
        m = sum(r[n]["r2"] for r in rows) / len(rows)
        refs = [ref_of(n, r["session"]) for r in rows]
        ref = f" ({sum(refs) / len(refs):.3f})" if all(x is not None for x in refs) else ""
        mean.append(f"**{m:.3f}**{ref}")
    mean += [f"{sum(r[n]['valid_r2'] for r in rows) / len(rows):.3f}" for n in grus]
    mean += [f"{sum(r[n]['fit_s'] for r in rows) / len(rows):.1f}" for n in names]
    lines.append("| " + " | ".join(mean) + " |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "bci_decoder", "benchmarks"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of .nwb files")
    ap.add_argument("--which", default=",".join(BASELINES), help="comma-separated baselines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--fit-seconds", type=float, default=None, help="fit on the first S s of the 70%% only"
    )
    ap.add_argument(
        "--with-previous", action="store_true", help="also the GRU at its pre-tuning defaults"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (figures depend on it)")
    ap.add_argument("--jobs", type=int, default=1, help="sessions scored in parallel processes")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    args = ap.parse_args()
    if args.plot_only:
        from benchmarks._plots import plot_only

        plot_only("baselines_real", args.plot_only)
        return
    torch.set_num_threads(args.threads)
    which = tuple(w.strip() for w in args.which.split(",") if w.strip())
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = run(
        args.data, which, args.seed, args.fit_seconds, args.with_previous, args.threads, args.jobs
    )
    names = which + (("gru_previous",) if args.with_previous else ())
    text = table(rows, names, with_reference=args.fit_seconds is None)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "commit": _commit(),
            "command": " ".join(["python"] + sys.argv),
            "seed": args.seed,
            "fit_seconds": args.fit_seconds,
            "torch_threads": args.threads,
            "jobs": args.jobs,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            },
            "wall_s": time.perf_counter() - t0,
            "previous_gru": PREVIOUS_GRU if args.with_previous else None,
            "reference": REFERENCE if args.fit_seconds is None else None,
        }
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2))
        from benchmarks._plots import draw

        draw("baselines_real", {**meta, "rows": rows}, args.json)
        args.json.with_suffix(".txt").write_text(
            f"{meta['command']}\ncommit {meta['commit']}, {args.threads} torch thread(s) per "
            f"session, {args.jobs} session(s) at a time, "
            f"load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n\n"
            + text
            + "\n"
        )
        print(f"wrote {args.json} and {args.json.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
