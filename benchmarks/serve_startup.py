"""Start-up of ``bci-decoder serve`` with a packaged model: seconds to ready and the
objects the garbage collector tracks afterwards (each full collection walks them all
while holding the GIL: ``runtime/gc_pauses.py``).

Each trial starts the daemon as a fresh process (the command a rig runs) and times from
the process start to the first ``GET /health`` that answers 200; ``/status.startup``
gives the tracked objects the daemon counted once it was built. The same figures for the
import set alone (what the daemon imports, nothing built) are printed beside them.

    .venv/bin/python benchmarks/serve_startup.py --trials 5 --json benchmarks/results/serve_startup.json
"""

from __future__ import annotations

import argparse
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

IMPORTS = (
    "import time, gc, sys; t = time.perf_counter(); "
    "import bci_decoder.cli, bci_decoder.api.app, bci_decoder.runtime.daemon, "
    "bci_decoder.runtime.engine, bci_decoder.runtime.replay, uvicorn; "
    "print(time.perf_counter() - t, len(gc.get_objects()), "
    "sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'scipy'}))"
)


def one_start(model: str, state: Path) -> dict:
    port = free_port()
    cfg = {"model": model, "models_dir": str(ROOT / "models"), "state_dir": str(state),
           "api": {"port": port, "token": "bench-token-0123"}, "behavior": None}  # fmt: skip
    path = state / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("bci-decoder")), "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        ready = time.perf_counter() - t0
        st = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
        return {"ready_s": ready, "gc_tracked_objects": st["startup"]["gc_tracked_objects"],
                "daemon_built_at_s": st["startup"]["process_age_s"]}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="poyo-mp-small")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = []
    for _ in range(a.trials):
        with tempfile.TemporaryDirectory() as d:
            rows.append(one_start(a.model, Path(d)))
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=2)  # fmt: skip
    imports = {"seconds": float(out[0]), "gc_tracked_objects": int(out[1]), "heavy": out[2]}
    ready = np.array([r["ready_s"] for r in rows])
    objs = np.array([r["gc_tracked_objects"] for r in rows])
    print(f"{'':28s}{'median':>10s}{'min':>10s}{'max':>10s}")
    print(
        f"{'start to ready (s)':28s}{np.median(ready):10.3f}{ready.min():10.3f}{ready.max():10.3f}"
    )
    print(f"{'GC-tracked objects':28s}{np.median(objs):10.0f}{objs.min():10.0f}{objs.max():10.0f}")
    print(f"imports alone: {imports['seconds']:.3f} s, {imports['gc_tracked_objects']} objects, "
          f"torch/scipy loaded: {imports['heavy'].strip()}")  # fmt: skip
    payload = {"run": run_info(), "model": a.model, "trials": rows, "imports": imports,
               "ready_s_median": float(np.median(ready)),
               "gc_tracked_objects_median": float(np.median(objs))}  # fmt: skip
    write_json(a.json, payload)
    return payload


if __name__ == "__main__":
    main()
