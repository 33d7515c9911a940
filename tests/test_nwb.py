"""Reading the real recordings and the NLB/DANDI layout; writing and reading back."""

from __future__ import annotations

import numpy as np
import pytest

from bci_decoder.data.nwb import load_sessions, read_nwb, write_nwb
from bci_decoder.data.session import Behavior, Session, time_split

EXPECTED = {
    "stevenson2011_m1": (171, "hand_vel"),
    "millerlab_s1_area2": (52, "hand_vel"),
    "jango_20160626_wfiso": (96, "force"),
    "jango_20160711_wfiso": (94, "force"),
    "chewie_20131003_co": (174, "hand_vel"),
    "chewie_20131219_co": (155, "hand_vel"),
    "mihi_20140303_co": (187, "hand_vel"),
}


@pytest.mark.slow
def test_reads_all_real_sessions(real_data):
    sessions = {s.session_id: s for s in load_sessions(real_data)}
    assert set(sessions) == set(EXPECTED)
    for sid, (units, output) in EXPECTED.items():
        s = sessions[sid]
        assert s.num_units == units, sid
        assert s.default_output() == output, sid
        assert np.all(np.diff(s.spike_times) >= 0)
        assert s.spike_times.dtype == np.float64
        beh = s.behavior[output]
        assert beh.data.shape[1] == 2
        split = time_split(s)
        assert split.train[0] == s.domain[0] and split.test[1] == s.domain[1]
        assert abs((split.test[0] - s.domain[0]) / s.duration - 0.7) < 1e-9


def test_silent_units_are_kept(real_data):
    """Center-out files have units with no spikes at all; they stay in the unit list."""
    s = read_nwb(real_data / "mihi_20140303_co.nwb")
    silent = set(range(s.num_units)) - set(np.unique(s.spike_units).tolist())
    assert len(silent) > 0 and s.num_units == 187


def test_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(36_000.0, 36_010.0, 500))
    s = Session(
        session_id="rt",
        subject="m",
        spike_times=t,
        spike_units=rng.integers(0, 4, 500),
        unit_ids=["a", "b", "c", "d"],
        brain_areas=["M1"] * 4,
        behavior={
            "hand_vel": Behavior(
                "hand_vel", np.arange(36_000.005, 36_010, 0.01), rng.normal(size=(1000, 2)), "cm/s"
            )
        },
        domain=(36_000.0, 36_010.0),
        trials={
            "start_time": np.array([36_000.0, 36_005.0]),
            "stop_time": np.array([36_004.0, 36_009.0]),
            "target_id": np.array([1, 2]),
        },
    )
    back = read_nwb(write_nwb(s, tmp_path / "rt.nwb"))
    np.testing.assert_array_equal(back.spike_times, s.spike_times)  # float64 exact
    np.testing.assert_array_equal(back.spike_units, s.spike_units)
    assert back.unit_ids == s.unit_ids and back.subject == "m"
    np.testing.assert_allclose(
        back.behavior["hand_vel"].data, s.behavior["hand_vel"].data, rtol=1e-6
    )
    np.testing.assert_array_equal(back.trials["target_id"], [1, 2])
    assert abs(back.domain[0] - 36_000.0) < 1e-9 and abs(back.domain[1] - 36_010.0) < 1e-6


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no NWB file"):
        read_nwb(tmp_path / "nope.nwb")
    with pytest.raises(FileNotFoundError, match="no .nwb files"):
        load_sessions(tmp_path)
