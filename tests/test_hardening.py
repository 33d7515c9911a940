"""Issue 11 (hardening), findings 1-8, each against the real daemon: real LSL on loopback,
a real uvicorn server over HTTP, the real ONNX Runtime engine, real child processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pylsl
import pytest

from bci_decoder.config import StreamSettings
from bci_decoder.data.simulate import SimConfig, simulate_session
from bci_decoder.runtime.client import StreamRecorder
from bci_decoder.runtime.decode_loop import lsl_clock
from bci_decoder.runtime.lsl_io import behavior_stream_info, spike_stream_info
from bci_decoder.runtime.replay import Replayer
from bci_decoder.train.checkpoint import Decoder
from tests.daemon_harness import ROOT, TOKEN, LiveServer, serve_config
from tests.daemon_harness import wait_for as _wait

pytestmark = pytest.mark.slow

MODEL = "poyo-mp-small"


@pytest.fixture(scope="module")
def session():
    """sim7_s0: a session the shipped model was pretrained on."""
    return simulate_session(SimConfig(seed=7, num_sessions=1, duration_s=300), 0)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")  # ONNX export cached here for the module


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The shipped model, and broken copies of it (finding 5)."""
    d = tmp_path_factory.mktemp("models")
    good = d / MODEL
    shutil.copytree(ROOT / "models" / MODEL, good)
    for name, meta in [("meta-list", []), ("meta-units-int", None)]:
        shutil.copytree(good, d / name)
        if meta is None:
            meta = json.loads((good / "meta.json").read_text()) | {"units": 5}
        (d / name / "meta.json").write_text(json.dumps(meta))
    dec = Decoder.load(good)
    with_nan = dec.clone()
    with_nan.model.unit_emb.weight.data[3, 0] = float("nan")
    with_nan.save(d / "nan-weights")
    # a stored calibration whose normaliser became inf in float32 (behaviour of 1e308)
    cal = dec.clone()
    session = next(iter(cal.norms))
    cal.norms[session]["hand_vel"].std[:] = np.float32("inf")
    cal.save(good / "calibrations" / "inf-norm")
    # what a killed job leaves: a hidden temporary folder (removed at start, never listed)
    dec.save(good / "calibrations" / ".tmp-half-123")
    return d


def _pull_for(rec: StreamRecorder, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rec.pull()


# ---------------------------------------------------------------- findings 4, 5 (+ 6)
def test_models_by_name_and_every_malformed_input_is_a_4xx(models_dir, state_dir):
    cfg = serve_config(state_dir, models_dir)
    with LiveServer(cfg) as srv:
        # finding 6: a half-written calibration is never listed, and is cleaned up
        assert not (models_dir / MODEL / "calibrations" / ".tmp-half-123").exists()
        outside = models_dir.parent / "elsewhere"
        shutil.copytree(models_dir / MODEL, outside / MODEL, dirs_exist_ok=True)
        cases = [
            ({"name": str(outside / MODEL)}, 422, "body.name"),  # absolute: refused
            ({"name": f"../{outside.name}/{MODEL}"}, 422, "body.name"),
            ({"name": "ü" * 200}, 422, "name"),  # was a 500
            ({"name": MODEL, "calibration": "../../x"}, 422, "body.calibration"),
            ({"name": MODEL, "calibration": ".tmp-half-123"}, 422, "calibration"),
            ({"name": "meta-list"}, 422, "must hold a JSON object"),
            ({"name": "meta-units-int"}, 422, "'units' must be a JSON list"),
            ({"name": "nan-weights"}, 422, "NaN/inf"),
            ({"name": MODEL, "calibration": "inf-norm"}, 422, "not finite"),
            ({"name": "no-such-model"}, 404, "no model"),
        ]
        for body, code, word in cases:
            r = srv.put("/model", json=body)
            assert r.status_code == code, (body, r.status_code, r.text)
            reply = r.json()
            assert isinstance(reply["detail"], str) and word in reply["detail"], (word, reply)
            assert isinstance(reply["errors"], list)
        assert srv.status()["model"] == srv.http.get("/model").json()
        assert srv.status()["model"]["calibration"] is None  # nothing was loaded
        # uploads: checked after conversion to float32, huge integers are a 422
        arrays = {
            "unit_ids": ["a", "b"], "spike_times": list(np.linspace(0, 9, 50)),
            "spike_units": [0, 1] * 25, "behavior_times": list(np.arange(40) * 0.25),
            "behavior": [[0.0, 1.0]] * 40,
        }  # fmt: skip
        for patch, word in [
            ({"behavior": [[0.0, 1e308]] * 40}, "float32"),
            ({"spike_units": [2**63] + [0, 1] * 24 + [0]}, "spike_units"),
            ({"spike_units": [2**70] + [0, 1] * 24 + [0]}, "spike_units"),
        ]:
            r = srv.post("/calibrations", json={"source": "upload", "data": arrays | patch})
            assert r.status_code == 422, (patch, r.text)
            assert word in r.json()["detail"]
        # the OpenAPI document lists what the routes return; errors match its schema
        doc = srv.http.get("/openapi.json").json()
        put = doc["paths"]["/model"]["put"]["responses"]
        assert {"401", "403", "404", "409", "413", "422"} <= set(put)
        ref = put["422"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorReply")
        post = doc["paths"]["/calibrations"]["post"]
        assert {"401", "403", "409", "413", "422"} <= set(post["responses"])
        assert "CalibrationCreate" in json.dumps(post["requestBody"])
        assert "CalibrationCreate" in doc["components"]["schemas"]
        r = srv.http.post("/decoder/start")
        assert r.status_code == 401 and isinstance(r.json()["detail"], str)


# ---------------------------------------------------------------- finding 1
def test_non_finite_output_never_reaches_the_outlet(session, models_dir, state_dir):
    cfg = serve_config(state_dir, models_dir, cadence_hz=100, safe_output="hold")
    with LiveServer(cfg) as srv:
        srv.post("/decoder/start")
        rep = Replayer(session, start=215.0, stop=235.0, source_id=cfg.spikes.source_id,
                       wait_for_consumer_s=10)  # fmt: skip
        rep.start()
        srv.wait_state("running")
        rec = StreamRecorder(StreamSettings(type="Control", source_id=cfg.control_source_id))
        _pull_for(rec, 2.0)
        # a decoder whose normaliser is NaN (as a float64-valid calibration of 1e308
        # became once in float32), swapped in past the load checks
        daemon = srv.daemon
        poisoned = Decoder.load(models_dir / MODEL)
        poisoned.norms[session.session_id]["hand_vel"].std[:] = np.float32("nan")
        daemon.swap_decoder(poisoned, daemon.model_dir, MODEL, None)
        _pull_for(rec, 2.0)
        st = srv.status()
        assert st["state"] == "degraded", st["state"]
        assert "not finite" in st["degraded"]
        assert st["errors"] > 100 and st["non_finite_outputs"] == st["errors"]
        assert st["safe_steps"] >= st["errors"]
        metrics = srv.http.get("/metrics").text
        assert 'bci_state{state="degraded"} 1' in metrics
        rep.stop()
    t, y, _ = rec.arrays()
    assert len(y) > 300
    assert np.isfinite(y).all(), f"{int((~np.isfinite(y)).sum())} non-finite outputs sent"
    after = y[t > t[0] + 2.5]
    assert len(after) > 100 and np.all(after == after[0])  # the held (safe) value


# ---------------------------------------------------------------- findings 2, 7 (counters)
def test_future_timestamp_is_rejected_and_counted(session, models_dir, state_dir):
    cfg = serve_config(state_dir, models_dir, cadence_hz=100, behavior=None)
    units = list(session.unit_ids)
    with LiveServer(cfg) as srv:
        out = pylsl.StreamOutlet(spike_stream_info("f", cfg.spikes.source_id, units, "sim7_s0"))
        srv.post("/decoder/start")
        assert out.wait_for_consumers(10)
        rng = np.random.default_rng(0)
        seq = 0

        def push(n: int, offset: float = 0.0) -> None:
            nonlocal seq
            now = lsl_clock()
            stamps = now + offset - np.sort(rng.uniform(0, 0.009, n))[::-1]
            rows = np.stack([rng.integers(0, len(units), n), seq + np.arange(n)], 1)
            seq += n
            out.push_chunk(rows.astype(np.int32), stamps.tolist())

        def stream(seconds: float, offset: float = 0.0) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                push(20, offset)
                time.sleep(0.01)

        stream(0.5)
        _wait(lambda: srv.status()["state"] == "running", 20, "running")
        push(1, offset=1000.0)  # one spike stamped 1000 s in the future
        stream(2.0)
        st = srv.status()
        # finding 8: which stream was opened (the daemon is pinned to this source id)
        assert st["stream"]["source_id"] == cfg.spikes.source_id == st["stream"]["pinned_source_id"]
        assert st["stream"]["hostname"] == socket.gethostname() and st["stream"]["name"] == "f"
        assert st["dropped"]["future_time"] == 1
        assert st["dropped"]["out_of_order"] == 0  # it did not become the newest time
        assert st["state"] == "running"
        kept = st["stream"]["kept"]
        assert kept >= 0.95 * (st["stream"]["received"] - 1)
        # a stream whose spikes are all in the future: stalled, safe value
        stream(1.6, offset=30.0)
        st = srv.status()
        assert st["state"] == "stalled", st["state"]
        assert st["stream"]["rejected_share_1s"] > 0.5
        assert st["stream"]["kept"] == kept
        stream(2.5)  # good again: running
        _wait(lambda: srv.status()["state"] == "running", 5, "running again")

        def engine_dropped() -> int:
            d = srv.status()["dropped"]
            return d["engine_late"] + d["engine_out_of_order"]

        # counters tell the truth: engine discards are in dropped and /metrics. After a
        # 0.35 s pause, spikes stamped inside the pause are in order for the inlet (newer
        # than its last) but late for the engine (it has stepped past their groups)
        before = engine_dropped()
        t_last = lsl_clock()
        push(5)
        time.sleep(0.35)
        rows = np.stack([np.arange(50) % len(units), seq + np.arange(50)], 1)
        seq += 50
        out.push_chunk(rows.astype(np.int32), (t_last + 0.05 + np.arange(50) * 1e-3).tolist())
        stream(0.3)

        _wait(lambda: engine_dropped() >= before + 50, 5, "50 engine discards")
        st = srv.status()
        rejected = st["engine"]["rejected"]
        assert st["dropped"]["engine_late"] == rejected["late"]
        assert st["dropped"]["engine_out_of_order"] == rejected["out_of_order"]
        metrics = srv.http.get("/metrics").text
        assert f"bci_dropped_future_time_total {st['dropped']['future_time']}" in metrics
        assert f"bci_dropped_engine_late_total {rejected['late']}" in metrics
        assert "bci_dropped_engine_overflow_total" in metrics
        assert st["errors"] == 0


# ---------------------------------------------------------------- finding 3
# The client of the chunked upload, in its own process as a real one would be: in this
# one it took the GIL from the server it measures (0.14-1.4 s to the 413 at load 13)
UPLOAD_CLIENT = r"""
import json, select, socket, sys, time
port, token, seconds = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
s.sendall(b"POST /calibrations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Authorization: Bearer " + token + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
piece = b'{"source": "upload", "nwb_base64": "' + b"A" * (1 << 20)
chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
s.settimeout(1.0)
t0 = time.monotonic()
sent, answer = 0, b""
while time.monotonic() - t0 < seconds and sent < 300 * 2**20:
    if select.select([s], [], [], 0)[0]:  # the server answered (or closed)
        try:
            answer = s.recv(65536)
        except ConnectionResetError:
            pass
        break
    try:
        s.sendall(chunk)
        sent += len(piece)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
elapsed = time.monotonic() - t0
s.settimeout(2.0)
try:
    while b"\r\n\r\n" not in answer:
        more = s.recv(65536)
        if not more:
            break
        answer += more
except (TimeoutError, ConnectionResetError):
    pass
s.close()
print(json.dumps({"elapsed": elapsed, "sent": sent, "answer": answer[:200].decode("latin-1")}))
"""


def _chunked_upload(port: int, seconds: float = 10.0) -> tuple[float, bytes, int]:
    """POST a chunked body (no Content-Length) of up to 300 MB as fast as the server takes
    it, until it answers; returns (seconds to the answer, the answer, bytes sent)."""
    res = subprocess.run(
        [sys.executable, "-c", UPLOAD_CLIENT, str(port), TOKEN, str(seconds)],
        capture_output=True, text=True, timeout=seconds + 30,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    return out["elapsed"], out["answer"].encode("latin-1"), out["sent"]


def _socket_buffers() -> int:
    """The most a loopback connection's kernel buffers can hold (receive + send)."""
    try:
        rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
        wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 64 * 2**20
    return rmem + wmem


def test_chunked_upload_is_refused_at_the_limit(session, models_dir, state_dir):
    # SCHED_FIFO for the loop as in configs/serve.yaml (where the kernel allows it): the
    # deadlines it misses are then the upload's doing, not the other jobs' on this machine
    cfg = serve_config(state_dir, models_dir, cadence_hz=100, realtime_priority=50)
    with LiveServer(cfg) as srv:
        srv.post("/decoder/start")
        rep = Replayer(session, start=215.0, stop=240.0, source_id=cfg.spikes.source_id,
                       wait_for_consumer_s=10)  # fmt: skip
        rep.start()
        srv.wait_state("running")
        time.sleep(1.0)
        idle = srv.status()
        time.sleep(2.0)
        before = srv.status()
        idle_missed = before["missed_deadlines"] - idle["missed_deadlines"]
        elapsed, answer, sent = _chunked_upload(cfg.api.port)
        after = srv.status()
        rep.stop()
    limit = cfg.api.max_body_mb * 2**20
    print(f"413 after {elapsed * 1e3:.0f} ms, {sent / 2**20:.0f} MB sent (limit "
          f"{limit / 2**20:.0f} MB); missed {after['missed_deadlines'] - before['missed_deadlines']}"
          f" (in 2 s before it: {idle_missed})")  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # the issue asks for 1 s. Why not at once: a chunked body's framing never reaches the
    # app (ASGI hands over de-chunked bytes), so the limit is crossed only once 32 MB
    # (api.max_body_mb) has come through uvicorn and the route's reads. On h11 (pure
    # Python, before serve asked for httptools) 0.15-0.76 s in 8 runs at load 9-13 on 2
    # cores, 0.10-0.30 s in 13 runs (78-122 ms of server-thread CPU) at load 3-4; on httptools
    # 0.09-0.18 s in 15 runs at load 3-4, 57-101 ms of CPU (about 20% less: the rest is
    # the ASGI receive path and the route, not the parser), so at load 13 it could still
    # take about 0.6 s. A declared Content-Length over the limit is refused before any
    # body is read (0.5-16 ms). 196 s before the fix (the limit waited for the whole body)
    assert elapsed < 1.0
    # refused as the limit was crossed, not at the end: past the limit the server reads no
    # more, but the kernel's buffers still take what they hold (52 MB was sent once here,
    # where loopback receive buffers grow to tcp_rmem's 32 MB)
    assert sent < limit + _socket_buffers() + 8 * 2**20, sent
    assert after["steps"] > before["steps"] and after["errors"] == 0
    # deadlines missed because of the upload: compared with as long a window without one
    missed = after["missed_deadlines"] - before["missed_deadlines"]
    assert missed <= max(10, 2 * idle_missed * elapsed / 2.0), (missed, idle_missed)


# ---------------------------------------------------------------- finding 7 (behaviour)
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_behavior_buffers_are_capped_whatever_the_declared_rate(models_dir, state_dir):
    cfg = serve_config(state_dir, models_dir, behavior_max_mb=32)
    with LiveServer(cfg) as srv:
        rss0 = _rss_mb()
        srv.post("/decoder/start")
        info = behavior_stream_info("fast", cfg.behavior.source_id, "hand_vel", ["x", "y"], 2e5)
        fast = pylsl.StreamOutlet(info, chunk_size=1, max_buffered=1)
        assert fast.wait_for_consumers(10)
        fast.push_chunk(np.zeros((100, 2), np.float32))
        st = _wait(lambda: (s := srv.status())["behavior"]["samples"] >= 100 and s, 10, "behaviour")
        b = st["behavior"]
        assert b["rate_hz"] == 2e5 and b["capacity"] * (8 + 4 * 2) <= 32 * 2**20
        assert _rss_mb() - rss0 < 150  # 600 s at 2e5 Hz would have been 1.9 GB
        del fast
        # a rate no buffer can hold (the 1e9 Hz costs the *sender* 2 GB, so 1e7
        # here: above the cap, the same path): refused, visibly; the thread lives on
        info = behavior_stream_info("absurd", cfg.behavior.source_id, "hand_vel", ["x"], 1e7)
        absurd = pylsl.StreamOutlet(info, chunk_size=1, max_buffered=1)
        st = _wait(
            lambda: (s := srv.status())["behavior"]["state"] == "refused" and s, 15, "refused"
        )
        assert "Hz" in st["behavior"]["last_error"] and st["behavior"]["errors"] >= 1
        assert srv.daemon.behavior_inlet.is_alive()
        del absurd


# ---------------------------------------------------------------- findings 6, 8 (processes)
def _cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bci_decoder.cli", *args], capture_output=True, text=True,
        cwd=cwd or ROOT, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip


def test_serve_errors_are_clear_and_quick(tmp_path):
    res = _cli("serve", cwd=tmp_path)  # outside the repository: no configs/serve.yaml
    assert res.returncode == 2 and "no config" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    res = _cli("serve", "--config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "no config file" in res.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        res = _cli("serve", "--config", "configs/serve.yaml", "--port", str(port))
        took = time.monotonic() - t0
    assert res.returncode == 2 and "in use" in res.stderr, res.stderr[-500:]
    assert "Traceback" not in res.stderr
    assert took < 8.0  # before the model loads (the whole start-up took 8.5 s + a traceback)


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_calibration_child_dies_with_the_daemon(tmp_path, models_dir, state_dir):
    import httpx
    import yaml

    from bci_decoder.data.nwb import write_nwb
    from bci_decoder.runtime.processes import free_port, wait_http

    new = simulate_session(SimConfig(seed=7, num_sessions=4, duration_s=60), 3)
    nwb = write_nwb(new.slice(0.0, 30.0), tmp_path / "block.nwb")
    models = tmp_path / "models"
    shutil.copytree(models_dir / MODEL, models / MODEL, ignore=shutil.ignore_patterns("cal*"))
    port = free_port()
    cfg = {"models_dir": str(models), "state_dir": str(state_dir), "behavior": None,
           "api": {"port": port, "token": TOKEN}}  # fmt: skip
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bci_decoder.cli", "serve", "--config", str(tmp_path / "serve.yaml")],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", 180)
        import base64

        body = {"source": "upload", "seconds": 30, "session": "kill-1", "name": "cal-kill",
                "steps": 5000, "nwb_base64": base64.b64encode(nwb.read_bytes()).decode()}  # fmt: skip
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(url + "/calibrations", json=body, headers=auth, timeout=60)
        assert r.status_code == 202, r.text
        job_url = f"{url}/calibrations/{r.json()['id']}"
        # the child runs at idle priority: beside a busy test process it may wait minutes
        job = _wait(lambda: (j := httpx.get(job_url).json())["phase"] and j, 400, "the fit")
        assert job["state"] == "running"
        kids = _children(proc.pid)
        assert kids, "no child process"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _wait(lambda: not any(_alive(k) for k in kids), 5, "the children to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not (models / MODEL / "calibrations" / "cal-kill").exists()
