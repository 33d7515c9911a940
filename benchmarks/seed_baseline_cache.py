"""Seed the transfer studies' baseline cache from a committed study result.

The studies (unit_identification.py, across_days.py) cache each baseline score under
``out/transfer_cache/baselines-<hash of the baselines' code>/``. That folder is not in git,
so a fresh clone refits every GRU (an ensemble of 3, minutes each on one thread). When the
baselines' code is the one a committed result was measured with, its scores are the
scores this code gives (fixed seeds), and this script writes them into the cache, each
entry marked with the commit it came from. It refuses when the code has changed since.

    .venv/bin/python benchmarks/seed_baseline_cache.py benchmarks/results/unit_identification.json \
        benchmarks/results/across_days.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from _transfer import CACHE, baselines_hash

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("results", type=Path, nargs="+")
    args = ap.parse_args(argv)
    folder = CACHE / baselines_hash()
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in args.results:
        result = json.loads(path.read_text())
        commit = result["commit"]
        changed = subprocess.run(
            ["git", "diff", "--quiet", commit, "--", "bci_decoder/baselines"], cwd=ROOT
        ).returncode
        if changed:
            raise SystemExit(f"{path}: the baselines' code changed since {commit[:10]}; refit")
        for row in result["rows"]:
            entries = {}
            if "requested_seconds" in row:  # unit_identification.json
                s = row["requested_seconds"]
                entries[f"gru_{s}"] = (row["gru_same_seconds"], row["seconds"])
                entries[f"wiener_{s}"] = (row["wiener_same_seconds"], row["seconds"])
            for m in ("gru_60", "wiener_60"):
                if m in row:
                    entries[m] = (row[m], None)
            for m in ("gru_full", "wiener_full"):
                entries[m] = (row[m], None)
            cache = folder / f"{row['session']}.json"
            done = json.loads(cache.read_text()) if cache.exists() else {}
            for m, (r2, seconds) in entries.items():
                if m not in done:
                    done[m] = {"r2": r2, "seconds": seconds, "wall_s": None, "cpu_s": None,
                               "from": f"{path.name}@{commit[:10]}"}  # fmt: skip
                    written += 1
            cache.write_text(json.dumps(done, indent=1))
    print(f"{written} baseline scores written to {folder}")
    return written


if __name__ == "__main__":
    main()
