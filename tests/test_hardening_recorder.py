"""The recorder (issue 11): everything in and out, in an HDF5 file that survives SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import yaml

from bci_decoder.data.simulate import SimConfig, simulate_session
from bci_decoder.runtime.decode_loop import lsl_clock
from bci_decoder.runtime.processes import free_port, wait_http
from bci_decoder.runtime.recorder import open_recording, summary
from bci_decoder.runtime.replay import Replayer
from tests.daemon_harness import ROOT, TOKEN, LiveServer, serve_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session():
    return simulate_session(SimConfig(seed=7, num_sessions=1, duration_s=300), 0)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


def test_recording_holds_everything_received_and_sent(session, state_dir, tmp_path):
    path = tmp_path / "rec.h5"
    cfg = serve_config(state_dir, cadence_hz=100, recording={"path": str(path)})
    with LiveServer(cfg) as srv:
        srv.post("/decoder/start")
        rep = Replayer(session, start=215.0, stop=221.0, source_id=cfg.spikes.source_id,
                       wait_for_consumer_s=10)  # fmt: skip
        rep.start()
        srv.wait_state("running")
        srv.put("/model", json={"name": "poyo-mp-small"})  # a swap: an event
        rep.done.wait(15)
        time.sleep(0.3)
        d = srv.daemon
        loop, inlet, binlet = d.loop, d.spike_inlet, d.behavior_inlet
        srv.post("/decoder/stop")  # what /status said last, frozen
        kept, steps, samples = inlet.stats.kept, loop.stats.steps, binlet.stats.kept
    info = summary(path)  # the server closed: the recorder flushed and closed the file
    # 6 s of 156 units and 100 Hz: about 0.5 MB of data (its chunks were once 133 MB)
    assert path.stat().st_size < 4 * 2**20, path.stat().st_size
    assert info["spikes"]["count"] == kept == len(rep.log.spike_time)
    assert info["outputs"]["count"] == steps > 300
    assert info["behavior"]["count"] == samples > 100
    assert info["lost"] == {"spikes": 0, "behavior": 0, "outputs": 0}
    assert {"start", "state", "spike-stream", "model"} <= set(info["events"]["kinds"])
    with open_recording(path) as f:
        np.testing.assert_array_equal(f["spikes/time"][:], rep.log.spike_time)
        np.testing.assert_array_equal(f["spikes/unit"][:], rep.log.spike_unit)
        t, sent = f["outputs/time"][:], f["outputs/sent"][:]
        assert np.all(np.diff(t) > 0) and np.all(sent >= t)
        assert np.isfinite(f["outputs/values"][:, :2]).all()
    # the CLI: a summary and an NWB export that pynwb reads back
    out = tmp_path / "rec.nwb"
    res = subprocess.run(
        [sys.executable, "-m", "bci_decoder.cli", "recording", str(path), "--nwb", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"spikes"' in res.stdout
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(out), "r") as io:
        nwb = io.read()
        n = sum(len(nwb.units["spike_times"][i]) for i in range(len(nwb.units)))
        assert n == len(rep.log.spike_time)
        assert len(nwb.acquisition["decoded"].timestamps) == steps


def _next_flush(path, timeout: float = 5.0) -> float:
    """The LSL clock when the recorder's next flush is seen in the file."""

    def outputs() -> int:
        with open_recording(path) as f:
            return f["outputs/time"].shape[0]

    n0, end = outputs(), time.monotonic() + timeout
    while time.monotonic() < end:
        if outputs() != n0:
            return lsl_clock()
        time.sleep(0.005)
    raise AssertionError(f"no flush within {timeout} s")


def test_recording_survives_sigkill(session, state_dir, tmp_path):
    port = free_port()
    path = tmp_path / "killed.h5"
    cfg = serve_config(state_dir, cadence_hz=100, recording={"path": str(path)})
    raw = cfg.model_dump(mode="json")
    raw["api"] = {"host": "127.0.0.1", "port": port, "token": TOKEN}
    raw["autostart"] = True
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(raw))
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bci_decoder.cli", "serve", "--config", str(tmp_path / "serve.yaml")],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", 180)
        rep = Replayer(session, start=215.0, stop=260.0, source_id=cfg.spikes.source_id,
                       wait_for_consumer_s=10)  # fmt: skip
        rep.start()
        deadline = time.time() + 30
        while httpx.get(url + "/status").json()["state"] != "running":
            assert time.time() < deadline, "never running"
            time.sleep(0.1)
        time.sleep(3.0)
        st = httpx.get(url + "/status").json()  # everything up to here is flushed 1 s later
        time.sleep(1.2)
        # the worst moment: just before the next flush lands. Watch the file (SWMR) for
        # one to land, then kill 0.99 s later, when a writer that flushes once a second
        # (plus the flush's own time) has not written for about a second
        landed = _next_flush(path)
        time.sleep(max(0.0, landed + 0.99 - lsl_clock()))
        killed_at = lsl_clock()  # the daemon's LSL clock too (same host)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        rep.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    info = summary(path)
    lost_s = {k: killed_at - info[k]["last"] for k in ("spikes", "outputs")}
    print(f"after SIGKILL: {info['spikes']['count']} spikes, {info['outputs']['count']} outputs "
          f"in the file; /status 1.2 s before the kill: {st['stream']['kept']}, {st['steps']}; "
          f"the file ends {lost_s['spikes']:.3f} s (spikes), {lost_s['outputs']:.3f} s "
          f"(outputs) before the kill")  # fmt: skip
    # at most the last second is lost (the replay sends spikes every few ms, steps every 10)
    assert max(lost_s.values()) < 1.0, lost_s
    assert info["spikes"]["count"] >= st["stream"]["kept"] > 1000
    assert info["outputs"]["count"] >= st["steps"] > 200
    with open_recording(path) as f:
        n = f["spikes/time"].shape[0]
        np.testing.assert_array_equal(f["spikes/time"][:], rep.log.spike_time[:n])
