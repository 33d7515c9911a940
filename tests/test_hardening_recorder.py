"""The recorder (issue 11): everything in and out, in an HDF5 file that survives SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pylsl
import pytest
import yaml

from bci_decoder.data.simulate import SimConfig, simulate_session
from bci_decoder.runtime.decode_loop import lsl_clock
from bci_decoder.runtime.lsl_io import spike_stream_info
from bci_decoder.runtime.processes import free_port, wait_http
from bci_decoder.runtime.recorder import open_recording, read_rejected, summary
from bci_decoder.runtime.replay import Replayer
from tests.daemon_harness import ROOT, TOKEN, LiveServer, SeqSpikes, serve_config

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
    assert info["lost"] == {"spikes": 0, "rejected": 0, "behavior": 0, "outputs": 0}
    assert info["rejected"] == {"count": 0, "recorded": True, "by_reason": {
        "nan_time": 0, "future_time": 0, "bad_unit": 0, "out_of_order": 0}}  # fmt: skip
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


def test_rejected_spikes_are_recorded_with_their_reason(state_dir, tmp_path):
    """Spikes the inlet rejects (NaN/inf/future/out-of-order times, unknown units), sent
    over real LSL, are in the file with their raw time, unit and reason, apart from the
    accepted ones; the counts equal /status's, and accepted + rejected = received."""
    meta = json.loads((ROOT / "models" / "poyo-mp-small" / "meta.json").read_text())
    labels = [u.split("/", 1)[1] for u in meta["units"] if u.startswith("sim7_s0/")]
    nunits = len(labels)
    path = tmp_path / "rejected.h5"
    cfg = serve_config(state_dir, cadence_hz=100, behavior=None, recording={"path": str(path)})
    sent: list[tuple[float, int, str]] = []  # the bad spikes, in the order sent
    with LiveServer(cfg) as srv:
        out = pylsl.StreamOutlet(spike_stream_info("bad", cfg.spikes.source_id, labels, "sim7_s0"))
        srv.post("/decoder/start")
        assert out.wait_for_consumers(10)
        spikes = SeqSpikes(out, nunits)
        push, stream = spikes.push, spikes.stream

        stream(0.5)
        for _ in range(3):
            time.sleep(0.02)  # the last chunk's spikes are all older than these
            now = lsl_clock()
            good = now - 0.010  # and the next chunk's all newer
            rows = [
                (good - 0.004, 1, ""), (float("nan"), 2, "nan_time"), (good - 0.003, 3, ""),
                (float("inf"), 4, "nan_time"), (float("-inf"), 5, "nan_time"),
                (now + 100.0, 6, "future_time"), (now + 5.0, 7, "future_time"),
                (good - 0.002, 8, ""), (good - 0.0025, 9, "out_of_order"),
                (good - 0.010, 10, "out_of_order"), (good - 0.002, 11, ""),
                (good - 0.001, -1, "bad_unit"), (good - 0.001, nunits, "bad_unit"),
                (good - 0.001, 2**31 - 1, "bad_unit"), (float("nan"), -7, "nan_time"),
                (good, 0, ""),
            ]  # fmt: skip
            push([r[0] for r in rows], [r[1] for r in rows])
            sent += [r for r in rows if r[2]]
            stream(0.2)
        time.sleep(0.5)
        st = srv.status()  # nothing is sent after this
        srv.post("/decoder/stop")
    d, s = st["dropped"], st["stream"]
    info = summary(path)  # the server closed: the recorder flushed and closed the file
    by_reason = info["rejected"]["by_reason"]
    print("rejected in the file:", by_reason, "/status:", {k: d[k] for k in by_reason})
    assert by_reason == {k: d[k] for k in ("nan_time", "future_time", "bad_unit", "out_of_order")}
    assert info["rejected"]["count"] == len(sent) == 3 * 11
    assert info["spikes"]["count"] == s["kept"]
    assert info["spikes"]["count"] + info["rejected"]["count"] == s["received"]
    assert info["lost"]["rejected"] == 0
    with open_recording(path) as f:
        rej = read_rejected(f)
        kept_t = f["spikes/time"][:]
    np.testing.assert_array_equal(rej["time"], [r[0] for r in sent])  # NaN == NaN here
    np.testing.assert_array_equal(rej["unit"], [r[1] for r in sent])
    assert list(rej["reason"]) == [r[2] for r in sent]
    assert np.isfinite(kept_t).all() and kept_t.max() < lsl_clock()  # none leaked in there


def test_rejected_binned_counts_keep_the_spikes_they_carried():
    """A SpikeCounts sample rejected for its time leaves the spikes it carried (its
    positive counts, unit = channel) with the reason; a negative count is one bad_unit
    row. No LSL needed: the inlet's handler is called directly."""
    from bci_decoder.config import StreamSettings
    from bci_decoder.runtime.lsl_io import SpikeInletThread
    from bci_decoder.runtime.ring import SpikeRing

    inlet = SpikeInletThread(StreamSettings(type="SpikeCounts"), SpikeRing(1000))
    inlet.counts, inlet.labels = True, ["a", "b", "c"]
    got: list = []
    inlet.on_rejected = lambda t, u, r: got.append((t.copy(), u.copy(), r.copy()))
    now = lsl_clock()
    data = np.array([[1, 0, 2], [0, 3, 0], [1, -1, 0], [0, 0, 0]], np.int32)
    times = np.array([now - 0.01, np.nan, now - 0.005, now + 50.0])
    inlet._handle(data, times)
    t, u, r = (np.concatenate(x) for x in zip(*got, strict=True))
    np.testing.assert_array_equal(t, [np.nan] * 3 + [now - 0.005])
    np.testing.assert_array_equal(u, [1, 1, 1, 1])
    np.testing.assert_array_equal(r, [1, 1, 1, 3])  # nan_time x3 (a count of 3), bad_unit
    st = inlet.stats
    assert (st.nan_time, st.future, st.bad_unit, st.kept) == (1, 1, 1, 4)
