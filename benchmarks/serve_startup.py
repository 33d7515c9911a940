"""Start-up of ``bci-decoder serve`` with a packaged model: seconds to ready and the
objects the garbage collector tracks afterwards (each full collection walks them all
while holding the GIL: ``runtime/gc_pauses.py``).

Each trial starts the daemon as a fresh process (the ``bci-decoder`` console script, the
command a rig runs) and times from the process start to the first ``GET /health`` that
answers 200: the server only answers once its ``lifespan`` has built the daemon (model
package loaded and checked, ring allocated, calibration manager and upload parser made).
``/status.startup`` gives the tracked objects the daemon counted once it was built. The
same figures for the import set alone (the console script's module, the app, the daemon,
uvicorn; nothing built) are printed beside them.

The poller reuses one HTTP client: a new ``httpx`` client per try builds an SSL context
(43 ms of CPU per refused try against 1.7 ms), so until the daemon had bound its socket
the poller took most of a core from it on this 2-core machine. Run it at the nice level
of the figures it is compared with (the JSON records the level and the load average
before and after), with the package's bytecode current (``python -m compileall
bci_decoder``, as an install leaves it: with PYTHONDONTWRITEBYTECODE set, stale ``.pyc``
files are recompiled at every start; one run at load 4 gave a median of 1.46 s with
them and 0.92 s without). ``--entry`` times another checkout, e.g. the code before a
change from ``git archive HEAD bci_decoder | tar -x -C /tmp/before``, run from outside
this folder with ``PYTHONPATH=/tmp/before --entry bci_decoder.cli:app``.

    nice -n 15 .venv/bin/python benchmarks/serve_startup.py --trials 15 \
        --json benchmarks/results/serve_startup.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bci_decoder.runtime.processes import free_port  # noqa: E402
from benchmarks._common import run_info, write_json  # noqa: E402

HEAVY = ("torch", "scipy", "typer", "h5py", "pynwb", "matplotlib", "onnx")
IMPORTS = (
    "import time, gc, sys; t = time.perf_counter(); "
    "import {entry}, bci_decoder.api.app, bci_decoder.runtime.daemon, uvicorn; "
    "print(time.perf_counter() - t, len(gc.get_objects()), "
    "sorted({m.split('.')[0] for m in sys.modules} & set(" + repr(HEAVY) + ")))"
)


def script() -> Path:
    return Path(sys.executable).with_name("bci-decoder")


def entry_module() -> str:
    """The module the ``bci-decoder`` console script imports (read from the script: an
    old ``*.egg-info`` in the checkout can shadow the installed entry points)."""
    m = re.search(r"^from (\S+) import", script().read_text(), re.M)
    return m.group(1) if m else "?"


def command(entry: str | None) -> list[str]:
    """The console script, or ``--entry MODULE:FUNCTION`` run as the script would run it
    (to time another checkout through PYTHONPATH, from a folder outside this one)."""
    if entry is None:
        return [str(script())]
    module, func = entry.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def one_start(model: str, state: Path, entry: str | None = None) -> dict:
    port = free_port()
    cfg = {"model": model, "models_dir": str(ROOT / "models"), "state_dir": str(state),
           "api": {"port": port, "token": "bench-token-0123"}, "behavior": None}  # fmt: skip
    path = state / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{port}/health"
    with httpx.Client(timeout=1) as http:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*command(entry), "serve", "--config", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"serve exited with {proc.returncode}")
                try:
                    if http.get(url).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
            ready = time.perf_counter() - t0
            cpu = cpu_seconds(proc.pid)
            st = http.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
            return {"ready_s": ready, "cpu_s": cpu,
                    "gc_tracked_objects": st["startup"]["gc_tracked_objects"],
                    "daemon_built_at_s": st["startup"]["process_age_s"]}  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(10)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process so far (Linux, 10 ms ticks): the work start-up
    needs. The machine's other load changes it less than the wall time, which also
    counts the waits for a core (a niced daemon on 2 busy cores waits most of it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def stats(x: np.ndarray) -> dict:
    return {"median": float(np.median(x)), "p99": float(np.percentile(x, 99)),
            "min": float(x.min()), "max": float(x.max())}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="poyo-mp-small")
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--entry", default=None, metavar="MODULE:FUNCTION",
                    help="start this instead of the bci-decoder script (e.g. an older "
                    "checkout's bci_decoder.cli:app through PYTHONPATH)")  # fmt: skip
    ap.add_argument("--plot-only", type=Path, metavar="JSON",
                    help="redraw the PNG of an earlier run's JSON, run nothing")  # fmt: skip
    a = ap.parse_args(argv)
    if a.plot_only:
        from benchmarks._plots import plot_only

        return plot_only("serve_startup", a.plot_only)
    info = run_info()
    info["nice"] = os.nice(0)
    rows = []
    for _ in range(a.trials):
        with tempfile.TemporaryDirectory() as d:
            rows.append(one_start(a.model, Path(d), a.entry))
    entry = entry_module() if a.entry is None else a.entry.split(":")[0]
    out = subprocess.run([sys.executable, "-c", IMPORTS.replace("{entry}", entry)],
                         capture_output=True, text=True, check=True).stdout.split(maxsplit=2)  # fmt: skip
    imports = {"modules": f"{entry}, bci_decoder.api.app, bci_decoder.runtime.daemon, uvicorn",
               "seconds": float(out[0]), "gc_tracked_objects": int(out[1]),
               "heavy_loaded": out[2].strip()}  # fmt: skip
    info["load_average_after"] = list(os.getloadavg())
    table = {
        "start to ready (s)": stats(np.array([r["ready_s"] for r in rows])),
        "daemon built at (s)": stats(
            np.array([r["daemon_built_at_s"] for r in rows if r["daemon_built_at_s"] is not None])
        ),
        "CPU to ready (s)": stats(
            np.array([r["cpu_s"] for r in rows if r.get("cpu_s") is not None])
        ),
        "GC-tracked objects": stats(np.array([r["gc_tracked_objects"] for r in rows], float)),
    }
    print(f"{a.trials} starts of `bci-decoder serve` ({entry}), nice {info['nice']}, "
          f"load average {info['load_average'][0]:.2f} -> {info['load_average_after'][0]:.2f}")  # fmt: skip
    print(f"{'':24s}{'median':>10s}{'p99':>10s}{'min':>10s}{'max':>10s}")
    for name, s in table.items():
        fmt = "10.0f" if "objects" in name else "10.3f"
        print(f"{name:24s}" + "".join(f"{s[k]:{fmt}}" for k in ("median", "p99", "min", "max")))
    print(f"imports alone: {imports['seconds']:.3f} s, {imports['gc_tracked_objects']} objects, "
          f"of {', '.join(HEAVY)} loaded: {imports['heavy_loaded']}")  # fmt: skip
    payload = {"run": info, "model": a.model, "entry": a.entry or f"{script()} ({entry})", "trials": rows, "table": table,
               "imports": imports,
               "ready_s_median": table["start to ready (s)"]["median"],
               "ready_s_p99": table["start to ready (s)"]["p99"],
               "gc_tracked_objects_median": table["GC-tracked objects"]["median"]}  # fmt: skip
    write_json(a.json, payload)
    from benchmarks._plots import draw

    draw("serve_startup", payload, a.json)
    return payload


if __name__ == "__main__":
    main()
