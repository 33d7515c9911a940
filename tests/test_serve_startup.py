"""What ``bci-decoder serve`` loads before it is ready, and its option parser.

Start to ready is import time (bci_decoder/serve.py, benchmarks/serve_startup.py), so a
module that lands on the serving path costs every start. The guard is not a timing: the
daemon starts in a subprocess through the console script's entry (``serve.main``); a
thread in it polls ``GET /health`` over a raw socket and, at the first 200, writes the
modules loaded then. None of the heavy ones may be among them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
import yaml

from bci_decoder import serve
from bci_decoder.cli import app
from bci_decoder.runtime.processes import free_port
from tests.daemon_harness import ROOT, TOKEN

# training, plotting, NWB and the CLI machinery: none is needed to serve
HEAVY = (
    "torch", "scipy", "sklearn", "pandas", "matplotlib", "h5py", "pynwb", "hdmf", "onnx",
    "typer", "rich", "tqdm", "bci_decoder.cli", "bci_decoder.train", "bci_decoder.model.poyo",
    "bci_decoder.calibrate", "bci_decoder.plots", "bci_decoder.data.nwb",
    "bci_decoder.runtime.recorder", "bci_decoder.export",
)  # fmt: skip

PROBE = """
import json, os, socket, sys, threading, time
port, report = int(sys.argv[1]), sys.argv[2]

def ready():
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"GET /health HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
                head = s.recv(64)
        except OSError:
            time.sleep(0.01)
            continue
        if head.startswith(b"HTTP/1.1 200"):
            return

def watch():
    ready()
    with open(report + ".tmp", "w") as f:  # renamed whole: the test polls for the name
        json.dump(sorted(sys.modules.copy()), f)  # copy: one atomic step
    os.replace(report + ".tmp", report)

threading.Thread(target=watch, daemon=True).start()
from bci_decoder.serve import main
sys.exit(main(["serve", "--config", sys.argv[3]]))
"""


def loaded(name: str, modules: list[str]) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


@pytest.mark.slow
def test_serve_is_ready_without_heavy_modules(tmp_path):
    port = free_port()
    cfg = {"model": "poyo-mp-small", "models_dir": str(ROOT / "models"),
           "state_dir": str(tmp_path / "state"), "behavior": None,
           "api": {"host": "127.0.0.1", "port": port, "token": TOKEN}}  # fmt: skip
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    report = tmp_path / "modules.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(port), str(report), str(tmp_path / "serve.yaml")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for _ in range(1200):
            if report.exists() or proc.poll() is not None:
                break
            try:
                proc.wait(0.05)
            except subprocess.TimeoutExpired:
                pass
        assert report.exists(), proc.stdout.read() if proc.poll() is not None else "no ready"
        modules = json.loads(report.read_text())
    finally:
        proc.terminate()
        proc.wait(10)
    # the snapshot is of a ready daemon
    assert loaded("fastapi", modules) and loaded("bci_decoder.runtime.daemon", modules)
    assert [h for h in HEAVY if loaded(h, modules)] == []


def typer_serve_options() -> set[str]:
    cmd = typer.main.get_command(app)
    return {o for p in cmd.commands["serve"].params for o in (*p.opts, *p.secondary_opts)}


def test_serve_parser_takes_the_cli_options():
    ours = {o for a in serve.serve_parser()._actions for o in a.option_strings}
    assert ours == typer_serve_options()


def test_serve_parser_leaves_the_rest_to_typer(tmp_path):
    got = serve.parse_serve(["--config", "a.yaml", "--port=9000", "--cadence", "250",
                             "--no-autostart", "--model", "m"])  # fmt: skip
    assert got == {"config": serve.Path("a.yaml"), "port": 9000, "cadence": 250.0,
                   "autostart": False, "model": "m"}  # fmt: skip
    assert serve.parse_serve([]) == dict.fromkeys(("config", "model", "port", "cadence",
                                                   "autostart"))  # fmt: skip
    for args in (["--help"], ["-h"], ["--port", "x"], ["--conf", "a"], ["extra"]):
        assert serve.parse_serve(args) is None, args
    # what typer would say: same exit code and message for a missing file either way
    for entry in ("from bci_decoder.serve import main; import sys; sys.exit(main())",
                  "from bci_decoder.cli import app; app()"):  # fmt: skip
        r = subprocess.run([sys.executable, "-c", entry, "serve", "--config",
                            str(tmp_path / "none.yaml")], capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 2 and f"error: no config file at {tmp_path}" in r.stderr, r
