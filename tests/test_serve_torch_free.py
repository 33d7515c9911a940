"""``bci-decoder serve`` with torch, scipy and the training code made unimportable.

The daemon runs in a subprocess whose first act is to put an import blocker on
``sys.meta_path`` (that process only: the spawned calibration child is a fresh
interpreter and imports torch as it should). It decodes a replayed session the model
does not know, calibrates it from its buffer over REST, applies the calibration (the
running engine takes the new unit tables: same engine, counters go on) and decodes the
session with it. At exit the process writes which blocked modules it holds and which
imports were refused; both must be empty.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

import httpx
import pytest
import yaml

from bci_decoder.data.simulate import SimConfig, simulate_session
from bci_decoder.runtime.processes import ProcessGroup, free_port, wait_http
from bci_decoder.runtime.replay import Replayer
from tests.daemon_harness import ROOT, TOKEN

pytestmark = pytest.mark.slow

BLOCKED = ("torch", "scipy", "bci_decoder.train")
WRAPPER = f"""
import json, os, sys, threading, time
BLOCKED = {BLOCKED!r}
refused = []

def blocked(name):
    return any(name == b or name.startswith(b + ".") for b in BLOCKED)

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if blocked(name):
            refused.append(name)
            raise ImportError(name + " is blocked in the serving process")
        return None

sys.meta_path.insert(0, Blocker())
report = sys.argv[1]

def write():  # every 0.2 s: what the process holds now (a stopped server may be killed)
    while True:
        loaded = sorted(m for m in list(sys.modules) if blocked(m))
        with open(report + ".tmp", "w") as f:
            json.dump(dict(loaded=loaded, refused=refused), f)
        os.replace(report + ".tmp", report)
        time.sleep(0.2)

threading.Thread(target=write, daemon=True).start()
from bci_decoder.serve import main  # the bci-decoder console script's entry
sys.exit(main(["serve", "--config", sys.argv[2]]))
"""


def _thread_priorities(pid: int) -> dict[str, int]:
    """{'tid name': SCHED_FIFO priority (0: normal)} of a process's live threads."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            out[f"{t} {name}"] = os.sched_getparam(int(t)).sched_priority
        except (OSError, ProcessLookupError):
            continue  # ended meanwhile
    return out


def test_serve_decodes_and_calibrates_without_torch(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "poyo-mp-small", models / "poyo-mp-small",
                    ignore=shutil.ignore_patterns("calibrations"))  # fmt: skip
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    cfg = {
        "model": "poyo-mp-small", "models_dir": str(models), "state_dir": str(tmp_path / "st"),
        "cadence_hz": 100, "autostart": True, "realtime_priority": 50,
        "spikes": {"type": "Spikes", "source_id": f"replay-{tag}"},
        "behavior": {"type": "Behavior", "source_id": f"replay-{tag}-behavior"},
        "control_source_id": f"control-{tag}",
        "api": {"host": "127.0.0.1", "port": port, "token": TOKEN},
    }  # fmt: skip
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    report = tmp_path / "modules.json"
    procs = ProcessGroup(tmp_path / "logs")
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # units the model has never seen: decoded only once calibrated
    session = simulate_session(SimConfig(seed=7, num_sessions=4, duration_s=120), 3)
    rep = Replayer(session, start=0.0, stop=120.0, source_id=cfg["spikes"]["source_id"],
                   wait_for_consumer_s=20)  # fmt: skip
    try:
        serve = procs.python("serve", ["-c", WRAPPER, str(report), str(tmp_path / "serve.yaml")])
        wait_http(f"{url}/health", 60, lambda: procs.check("serve"))
        http = httpx.Client(base_url=url, timeout=30.0)
        rep.start()

        def status() -> dict:
            return http.get("/status").json()

        deadline = time.time() + 40
        while not (status()["state"] == "running" and status()["behavior"]["seconds"] >= 12):
            assert time.time() < deadline, status()
            time.sleep(0.5)
        st = status()
        assert st["model"]["calibrated"] is False and st["engine"]["spikes"] == 0
        # serve's threads: the hot ones at SCHED_FIFO 50, every other one (REST server,
        # behaviour inlet, liblsl's own) at 40, none left normal to hold the GIL or a lock
        # the loop waits for (where the kernel refuses, the reason is in /status)
        rt = st["realtime"]
        if "not permitted" not in str(rt):
            assert rt["support_priority"] == 40 and rt["threads"] == {
                "decode_loop": "SCHED_FIFO 50", "spike_inlet": "SCHED_FIFO 50",
                "others": "SCHED_FIFO 40",
            }, rt  # fmt: skip
            # threads started by the real-time ones come up normal and are raised within
            # a second (priority.realtime_process)
            for _ in range(10):
                prios = _thread_priorities(serve.pid)
                if set(prios.values()) <= {40, 50}:
                    break
                time.sleep(0.5)
            assert set(prios.values()) <= {40, 50} and 50 in prios.values(), prios
        assert st["startup"]["gc_tracked_objects"] > 0
        r = http.post("/calibrations", headers=auth, json={
            "source": "buffer", "seconds": 12, "steps": 20, "holdout": 0.0, "name": "cal-t",
        })  # fmt: skip
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.time() + 240
        while (job := http.get(f"/calibrations/{job_id}").json())["state"] == "running":
            assert time.time() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "done", job
        before = status()
        r = http.post(f"/calibrations/{job_id}/apply", headers=auth)
        assert r.status_code == 200, r.text
        # the same engine (its counters go on) with new tables: no engine was rebuilt. 100
        # steps take 1 s at 100 Hz, but beside a training in CI the daemon (normal
        # priority here) once made 89 in 2 s; a new engine would count from 0
        t_apply = time.time()
        while (after := status())["engine"]["steps"] <= before["engine"]["steps"] + 100:
            assert time.time() < t_apply + 20, (before["engine"], after["engine"])
            time.sleep(0.5)
        assert after["model"]["calibration"] == "cal-t" and after["model"]["calibrated"]
        assert after["engine"]["tables_version"] != before["engine"]["tables_version"]
        assert after["swaps"] == before["swaps"] + 1
        assert after["engine"]["spikes"] > 0  # the replay now decodes with its units
        assert after["errors"] == 0 and after["non_finite_outputs"] == 0
        http.close()
        time.sleep(0.5)  # a report written after the apply
        got = json.loads(report.read_text())
    finally:
        rep.stop()
        procs.stop("serve")
    log = (tmp_path / "logs" / "serve.log").read_text()
    assert got == {"loaded": [], "refused": []}, (got, log[-2000:])
