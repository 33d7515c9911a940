"""FALCON's own local evaluator runs our decoder end to end, next to a Wiener filter, on
small files written in FALCON's M2 layout from the simulated sessions the shipped model
was pretrained on (their last 30%, which training never saw)."""

from __future__ import annotations

import numpy as np
import pytest

from bci_decoder.data.simulate import SimConfig, simulate_session
from tests.daemon_harness import ROOT

falcon = pytest.importorskip("bci_decoder.falcon", reason="pip install -e '.[dev]' (make venv)")
pytestmark = pytest.mark.slow

MODEL = ROOT / "models" / "poyo-mp-small"
SECONDS = 12.0  # per file; 7 files (M2's held-in minival set)


@pytest.fixture(scope="module")
def sessions():
    cfg = SimConfig(seed=7, num_sessions=3, duration_s=300)  # the model's pretraining set
    return [simulate_session(cfg, i) for i in range(3)]


@pytest.fixture(scope="module")
def m2_files(sessions, tmp_path_factory):
    """Seven 12 s files in <root>/m2/minival, tag i from session i % 3, each a different
    stretch of the held-out last 30% (210-300 s)."""
    root = tmp_path_factory.mktemp("falcon")
    tags = {}
    for i, tag in enumerate(falcon.M2_HELD_IN):
        s = sessions[i % 3]
        lo = 210.0 + (i // 3) * 25.0
        run, date = tag.split("_")
        falcon.write_m2_file(s, root / "m2" / "minival" / f"sub-MonkeyN{run}_{date}_held_in_minival.nwb",
                             (lo, lo + SECONDS))  # fmt: skip
        tags[tag] = s.session_id
    return root, tags


def test_layout_reads_back_through_falcon_loader(sessions, m2_files):
    """The files are what FALCON's M2 loader expects: 20 ms bins, the same counts we
    bin, the targets we wrote."""
    from falcon_challenge.config import FalconTask
    from falcon_challenge.dataloaders import load_nwb

    root, _ = m2_files
    path = sorted((root / "m2" / "minival").glob("*.nwb"))[0]  # Run1_20201019: sim7_s0
    counts, vel, trial_change, mask = load_nwb(path, dataset=FalconTask.m2)
    s = sessions[0]
    lo = 210.0
    starts = lo + np.arange(len(counts)) * falcon.BIN_S
    assert counts.shape == (int(SECONDS / 0.02), s.num_units) and vel.shape[1] == 2
    assert np.array_equal(counts, falcon.bin_counts(s, starts))
    assert np.allclose(vel, falcon.target_at(s, "hand_vel", starts + falcon.BIN_S), atol=1e-5)
    assert mask.sum() == len(mask) - 50 and trial_change.sum() == np.ceil(SECONDS / 5)
    # read back as a Session to calibrate on: the same counts in the same bins
    back = falcon.read_falcon(path, "m2")
    assert back.session_id == "falcon-m2-Run1_20201019" and back.num_units == s.num_units
    rebinned = falcon.bin_counts(back, np.arange(len(counts)) * falcon.BIN_S)
    assert np.array_equal(rebinned, counts)
    assert len(back.behavior["hand_vel"].timestamps) == mask.sum()


def test_falcon_evaluator_runs_our_decoder(sessions, m2_files, tmp_path):
    """The acceptance test: FALCON's evaluator drives FalconDecoder (ONNX engine, reset
    per file) and a Wiener filter through the same path; ours scores R² > 0.5 and runs
    faster than real time."""
    root, tags = m2_files
    cfg = falcon.task_config("m2")
    ours = falcon.FalconDecoder(cfg, MODEL, tags, state_dir=ROOT / "out" / "falcon")
    res = falcon.evaluate(ours, "m2", root, tmp_path / "ours")
    filters = {}
    for tag, sid in tags.items():
        s = next(x for x in sessions if x.session_id == sid)
        filters[tag] = falcon.fit_wiener(s, "hand_vel", (0.0, 210.0))  # the training part
    wiener = falcon.evaluate(falcon.WienerFalconDecoder(cfg, filters), "m2", root, tmp_path / "w")
    print(
        f"FALCON M2 evaluator on simulated files: ours R² {res['Held In R2 Mean']:.3f} "
        f"(± {res['Held In R2 Std.']:.3f}), normalised latency {res['Normalized Latency']:.4f}; "
        f"Wiener R² {wiener['Held In R2 Mean']:.3f} (± {wiener['Held In R2 Std.']:.3f}), "
        f"normalised latency {wiener['Normalized Latency']:.4f}"
    )
    assert res["Held In R2 Mean"] > 0.5
    assert res["Normalized Latency"] < 1.0  # faster than the data arrive
    assert wiener["Held In R2 Mean"] > 0.3


def test_reset_starts_each_file_afresh(sessions, m2_files):
    """Two files decoded one after the other give each file what it gives alone: the
    reset at the boundary leaves nothing of the first file in the engine."""
    from falcon_challenge.config import FalconTask
    from falcon_challenge.dataloaders import load_nwb

    root, tags = m2_files
    files = sorted((root / "m2" / "minival").glob("*.nwb"))
    cfg = falcon.task_config("m2")
    dec = falcon.FalconDecoder(cfg, MODEL, tags, state_dir=ROOT / "out" / "falcon")

    def run(path, n=150):
        counts = load_nwb(path, dataset=FalconTask.m2)[0][:n]
        dec.reset([path])
        return np.stack([dec.predict(c[None])[0] for c in counts])

    alone = run(files[1])
    run(files[0])
    after = run(files[1])
    assert np.allclose(alone, after, atol=1e-5)
    with pytest.raises(KeyError, match="no calibration"):
        dec.reset([root / "sub-MonkeyNRun1_20201030_held_out_minival.nwb"])
