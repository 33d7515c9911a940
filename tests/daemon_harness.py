"""Test harness for the daemon: a real uvicorn server in a thread, real LSL on loopback.

Every stream gets a random source id, so tests never pick up each other's (or a
developer's) streams.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from bci_decoder.api.app import create_app
from bci_decoder.config import ServeConfig, StreamSettings
from bci_decoder.runtime.daemon import Daemon
from bci_decoder.runtime.processes import free_port
from bci_decoder.serve import uvicorn_config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"


def serve_config(state_dir: Path, models_dir: Path | None = None, **kw) -> ServeConfig:
    tag = uuid.uuid4().hex[:8]
    base = {
        "models_dir": str(models_dir or ROOT / "models"),
        "state_dir": str(state_dir),
        "spikes": StreamSettings(type="Spikes", source_id=f"replay-{tag}"),
        "behavior": StreamSettings(type="Behavior", source_id=f"replay-{tag}-behavior"),
        "control_source_id": f"control-{tag}",
        "api": {"host": "127.0.0.1", "port": free_port(), "token": TOKEN},
        # nice alone: at SCHED_IDLE a fit beside the other test process (make test runs
        # two) waited more than 150 s for CPU time in CI; tests that measure the decode
        # loop during a fit ask for "idle"
        "calibration_priority": "low",
    }
    base.update(kw)
    return ServeConfig(**base)


class LiveServer:
    """``create_app`` served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.app = create_app(cfg)
        # the daemon's own uvicorn settings (httptools), so tests measure what it serves with
        self.server = uvicorn.Server(uvicorn_config(self.app, host="127.0.0.1", port=cfg.api.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{cfg.api.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30.0)
        self.auth = {"Authorization": f"Bearer {TOKEN}"}

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.http.close()

    @property
    def daemon(self) -> Daemon:
        return self.app.state.daemon

    def status(self) -> dict:
        r = self.http.get("/status")
        r.raise_for_status()
        return r.json()

    def post(self, path: str, **kw) -> httpx.Response:
        kw["headers"] = self.auth | kw.get("headers", {})
        return self.http.post(path, **kw)

    def put(self, path: str, **kw) -> httpx.Response:
        return self.http.put(path, headers=self.auth, **kw)

    def wait_state(self, state: str, timeout: float = 20.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.status()
            if s["state"] == state:
                return s
            time.sleep(0.05)
        raise AssertionError(f"state stayed {self.status()['state']!r}, wanted {state!r}")


def wait_for(cond, timeout: float, what: str):
    """Poll ``cond`` every 50 ms until it returns something truthy (returned), or fail
    saying what was awaited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class SeqSpikes:
    """Pushes spikes to a spike outlet as (unit, seq) rows, seq counting every spike sent,
    so a gap LSL made would show; ``stream`` sends 20 plausible spikes every 10 ms."""

    def __init__(self, outlet, num_units: int, seed: int = 0) -> None:
        self.outlet, self.num_units = outlet, num_units
        self.rng = np.random.default_rng(seed)
        self.seq = 0

    def push(self, stamps, units) -> None:
        rows = np.stack([units, self.seq + np.arange(len(units))], 1).astype(np.int32)
        self.seq += len(units)
        self.outlet.push_chunk(rows, np.asarray(stamps, np.float64).tolist())

    def stream(self, seconds: float) -> None:
        from bci_decoder.runtime.decode_loop import lsl_clock

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            now = lsl_clock()
            ages = np.sort(self.rng.uniform(0, 0.009, 20))[::-1]
            self.push(now - ages, self.rng.integers(0, self.num_units, 20))
            time.sleep(0.01)
