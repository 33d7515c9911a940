"""What every benchmark's JSON carries: the commit, the command and the machine's load."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DATA_DIRS = (SHARED_DATA / "real", SHARED_DATA / "corpus")


def run_info() -> dict:
    """Commit (with a dirty flag), command line, start time, load average and machine."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
    }


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")


def find_session_file(session_id: str, folders: tuple[Path, ...] = DATA_DIRS) -> Path:
    """The NWB file of a session id in the shared data folders."""
    for folder in folders:
        path = folder / f"{session_id}.nwb"
        if path.exists():
            return path
    raise SystemExit(f"no {session_id}.nwb in {', '.join(str(f) for f in folders)}")
