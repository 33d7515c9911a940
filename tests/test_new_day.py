"""The daemon decodes a new day of a known subject zero-shot: the stream's session is
unknown, but its subject (desc/subject) and channel names are known, so the earlier day's
tables decode it with no fitting; /status says which tables are in use and where from."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from bci_decoder.config import StreamSettings
from bci_decoder.data.nwb import read_nwb
from bci_decoder.data.session import Session
from bci_decoder.demo import align
from bci_decoder.metrics import r2_score
from bci_decoder.runtime.client import StreamRecorder
from bci_decoder.runtime.replay import Replayer
from tests.conftest import require_real_data
from tests.daemon_harness import ROOT, LiveServer, serve_config

pytestmark = pytest.mark.slow
JANGO = "jango_20160626_wfiso"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The shipped model, told who and when its Jango session was (models trained from now
    on record it themselves: info.session_meta)."""
    d = tmp_path_factory.mktemp("models")
    shutil.copytree(ROOT / "models" / "poyo-mp-small", d / "poyo-mp-small")
    # meta.json for the torch side, package.json for the daemon (which reads only that)
    for name in ("meta.json", "package.json"):
        path = d / "poyo-mp-small" / name
        meta = json.loads(path.read_text())
        meta["info"]["session_meta"] = {JANGO: {"subject": "Jango", "recorded_at": "2016-06-26"}}
        path.write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def new_day() -> Session:
    """Jango's test part as if recorded on a later day, its channels in the 2014 naming."""
    s = read_nwb(require_real_data(f"{JANGO}.nwb")).slice(900.0, 1000.0)
    return Session(
        session_id="jango_later_day", subject="Jango", spike_times=s.spike_times,
        spike_units=s.spike_units, unit_ids=[f"ee{int(u[2:4]):03d}u0" for u in s.unit_ids],
        brain_areas=s.brain_areas, behavior=s.behavior, domain=s.domain,
        recorded_at="2016-07-11",
    )  # fmt: skip


def test_new_day_of_a_known_subject_decodes_zero_shot(models_dir, new_day, tmp_path):
    cfg = serve_config(tmp_path, models_dir, cadence_hz=50)
    with LiveServer(cfg) as srv:
        srv.post("/decoder/start")
        rep = Replayer(new_day, start=900.0, stop=1000.0, source_id=cfg.spikes.source_id,
                       wait_for_consumer_s=10)  # fmt: skip
        rep.start()
        st = srv.wait_state("running", timeout=60)
        tables = st["model"]["tables"]
        assert tables["kind"] == "zero-shot warm start", tables
        assert tables["units_matched"] == new_day.num_units and tables["session_from"] == JANGO
        assert tables["readout"] is None  # Jango's readouts belong to its own days
        assert st["model"]["calibrated"] is True and st["model"]["session"] == "jango_later_day"
        dec = StreamRecorder(StreamSettings(type="Control", source_id=cfg.control_source_id))
        beh = StreamRecorder(StreamSettings(type="Behavior", source_id=cfg.behavior.source_id))
        end = time.monotonic() + 25.0
        while time.monotonic() < end:
            dec.pull(0.002), beh.pull(0.002)
        rep.stop()
    td, yd, _ = dec.arrays()
    tb, xb, _ = beh.arrays()
    pred, ok = align(td, yd, tb, 0.02)
    ok &= tb > tb[0] + 2.0  # the first second builds the context
    assert np.all(np.isfinite(yd))
    r2 = r2_score(xb[ok], pred[ok])
    print(f"zero-shot new day, live: R² {r2:.3f} over {ok.sum()} behaviour samples")
    assert r2 > 0.5
