"""Reading the real recordings and the NLB/DANDI layout; writing and reading back."""

from __future__ import annotations

import numpy as np
import pytest

from bci_decoder.data.nwb import (
    load_sessions,
    read_nwb,
    spikes_from_counts,
    write_binned_nwb,
    write_nwb,
)
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


def _binned_fixture(tmp_path, seed: int = 0):
    rng = np.random.default_rng(seed)
    width, T, U = 0.05, 400, 5
    starts = 10.0 + width * np.arange(T)  # a session that does not start at 0
    counts = rng.poisson(0.8, size=(T, U))
    counts[:, 3] = 0  # a flat (silent) channel, as the corpus has
    beh = Behavior("cursor_pos", starts + width / 2, rng.normal(size=(T, 2)))
    path = write_binned_nwb(
        tmp_path / "binned.nwb",
        counts,
        starts,
        width,
        [f"ee{j + 1:02d}u0" for j in range(U)],
        ["M1"] * U,
        {"cursor_pos": beh},
        identifier="spike_20990101_wf",
        subject="Spike",
        recorded_at="2099-01-01T12:00:00-05:00",
    )
    return path, counts, starts, width


def test_binned_file_reads_back_as_spikes(tmp_path):
    """A binned file (corpus layout) becomes a Session whose spikes fall inside their bins,
    in the right number per bin and unit, the same every time the file is read."""
    path, counts, starts, width = _binned_fixture(tmp_path)
    s = read_nwb(path)
    assert s.session_id == "spike_20990101_wf" and s.subject == "Spike"
    assert s.recorded_at.startswith("2099-01-01T12:00:00")
    assert s.unit_ids[0] == "ee01u0" and s.num_units == counts.shape[1]
    assert len(s.spike_times) == counts.sum()
    assert np.all(np.diff(s.spike_times) >= 0)
    # re-binning at the source's bins gives back the counts exactly
    rebinned = np.zeros_like(counts)
    b = np.floor((s.spike_times - starts[0]) / width + 1e-9).astype(int)
    np.add.at(rebinned, (b, s.spike_units), 1)
    np.testing.assert_array_equal(rebinned, counts)
    assert s.default_output() == "cursor_pos"
    assert s.domain[0] == pytest.approx(starts[0]) and s.domain[1] == pytest.approx(
        starts[-1] + width
    )
    again = read_nwb(path)
    np.testing.assert_array_equal(again.spike_times, s.spike_times)  # fixed seed
    # not all at a bin edge: spread uniformly inside the bin
    frac = (s.spike_times - starts[b]) / width
    assert 0.4 < frac.mean() < 0.6 and frac.min() >= 0 and frac.max() < 1


def test_spikes_from_counts_rejects_bad_input():
    with pytest.raises(ValueError, match="bin starts"):
        spikes_from_counts(np.zeros((3, 2)), np.zeros(4), 0.05, seed=0)
    with pytest.raises(ValueError, match="negative"):
        spikes_from_counts(-np.ones((3, 2)), np.zeros(3), 0.05, seed=0)


def test_file_without_spikes_is_a_clear_error(tmp_path):
    import h5py

    path, *_ = _binned_fixture(tmp_path)
    with h5py.File(path, "a") as f:  # drop the counts: nothing left to read
        del f["processing/ecephys/spike_counts"]
    with pytest.raises(ValueError, match="no spikes to read"):
        read_nwb(path)


@pytest.mark.slow
def test_reads_every_corpus_session(corpus_data):
    """Every corpus file loads: 21 Spike days, Jango 2014, two monkey E days (sparse
    behaviour) and MC_Maze_Small (true spike times, no behaviour, a UUID identifier)."""
    files = sorted(corpus_data.glob("*.nwb"))
    assert len(files) == 25
    subjects = {}
    for f in files:
        s = read_nwb(f)
        assert s.session_id == f.stem, f
        assert len(s.spike_times) > 1000 and np.all(np.diff(s.spike_times) >= 0), f
        assert s.recorded_at, f
        subjects.setdefault(s.subject, []).append(s.session_id)
        if s.subject == "Jenkins":
            assert not s.behavior and s.num_units == 107
        else:
            assert s.num_units == 96 and s.default_output() == "cursor_pos", f
    assert sorted(subjects) == ["E", "Jango", "Jenkins", "Spike"]
    assert len(subjects["Spike"]) == 21
