"""The simulated M1 sessions: determinism, rates, refractoriness, NWB, learnability."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from bci_decoder.data.nwb import read_nwb
from bci_decoder.data.session import time_split
from bci_decoder.data.simulate import (
    SimConfig,
    _refractory,
    sample_units,
    simulate_session,
    simulate_sessions,
    write_simulated,
)
from bci_decoder.metrics import binned_counts, r2_score

SMALL = SimConfig(seed=7, num_sessions=2, duration_s=30.0, num_units=(20, 30))


@pytest.fixture(scope="module")
def small():
    return simulate_sessions(SMALL)


@pytest.fixture(scope="module")
def full():
    """A default-size session (300 s, 80-160 units)."""
    return simulate_session(SimConfig(seed=0), 0)


def _arrays(s):
    out = [s.spike_times, s.spike_units]
    out += [b.timestamps for b in s.behavior.values()] + [b.data for b in s.behavior.values()]
    return out + list(s.trials.values())


def test_same_seed_is_byte_identical(small):
    again = simulate_sessions(SMALL)
    for a, b in zip(small, again, strict=True):
        assert a.session_id == b.session_id and a.unit_ids == b.unit_ids
        assert a.description == b.description
        for x, y in zip(_arrays(a), _arrays(b), strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_different_seed_differs(small):
    other = simulate_session(SMALL.model_copy(update={"seed": 8}), 0)
    assert other.session_id != small[0].session_id
    a, b = small[0], other
    n = min(len(a.spike_times), len(b.spike_times))
    assert not np.array_equal(a.spike_times[:n], b.spike_times[:n])
    assert not np.array_equal(a.behavior["hand_vel"].data, b.behavior["hand_vel"].data)


def test_sessions_have_their_own_populations(small):
    a, b = small
    assert a.session_id == "sim7_s0" and b.session_id == "sim7_s1"
    assert a.subject == "sim-monkey-0" and b.subject == "sim-monkey-1"
    assert a.unit_ids[:2] == ["u000", "u001"] and set(a.brain_areas) == {"M1"}
    ua, ub = sample_units(SMALL, 0), sample_units(SMALL, 1)
    assert a.num_units == ua.num_units and b.num_units == ub.num_units
    n = min(ua.num_units, ub.num_units)
    assert not np.allclose(ua.preferred_direction[:n], ub.preferred_direction[:n])
    assert "simulated" in a.description.lower() and '"seed": 7' in a.description


def test_layout_and_behaviour(small):
    for i, s in enumerate(small):
        assert s.domain == (0.0, 30.0)
        assert s.spike_times.dtype == np.float64 and np.all(np.diff(s.spike_times) >= 0)
        assert s.spike_times[0] >= 0.0 and s.spike_times[-1] < 30.0
        # spike times are continuous, not on the 1 ms simulation grid
        frac = np.mod(s.spike_times * 1000.0, 1.0)
        assert np.std(frac) > 0.2
        vel, pos = s.behavior["hand_vel"], s.behavior["hand_pos"]
        assert vel.data.shape == (3000, 2) and pos.data.shape == (3000, 2)
        assert np.allclose(np.diff(vel.timestamps), 0.01)
        assert vel.unit == "cm/s" and pos.unit == "cm"
        speed = np.hypot(*vel.data.T)
        assert 20.0 < np.percentile(speed, 99) < 55.0
        # velocity is the derivative of position
        num = np.gradient(pos.data.astype(np.float64), vel.timestamps, axis=0)
        assert r2_score(vel.data[5:-5], num[5:-5]) > 0.98
        tr = s.trials
        assert np.all(tr["start_time"] < tr["stop_time"]) and tr["stop_time"][-1] <= 30.0
        if i % 2 == 0:  # "mixed": even sessions are center-out
            assert set(np.unique(tr["target_id"])) <= set(range(8))
            assert len(np.unique(tr["target_id"])) == 8
        else:
            assert np.all(tr["target_id"] == -1)


def test_rates_in_range(full):
    units = sample_units(SimConfig(seed=0), 0)
    assert 80 <= units.num_units <= 160
    assert units.baseline_hz.min() >= 2.0 and units.baseline_hz.max() <= 60.0
    counts = np.bincount(full.spike_units, minlength=full.num_units)
    rates = counts / full.duration
    assert rates.min() > 1.0 and rates.max() < 120.0
    assert 5.0 < rates.mean() < 40.0
    # the empirical rate follows the unit's baseline
    assert np.corrcoef(np.log(rates), np.log(units.baseline_hz))[0, 1] > 0.9


def test_refractory_period_respected(full):
    order = np.lexsort((full.spike_times, full.spike_units))
    t, u = full.spike_times[order], full.spike_units[order]
    same = u[1:] == u[:-1]
    assert np.diff(t)[same].min() >= 0.002 - 1e-12


def test_refractory_deletion_matches_sequential_rule():
    rng = np.random.default_rng(0)
    units = np.sort(rng.integers(0, 5, 4000))
    times = np.concatenate([np.sort(rng.uniform(0, 1, (units == u).sum())) for u in range(5)])
    keep = _refractory(times, units, 0.002)
    expected = np.zeros_like(keep)
    last = {}
    for i, (t, u) in enumerate(zip(times, units, strict=True)):
        if t - last.get(u, -np.inf) >= 0.002:
            expected[i] = True
            last[u] = t
    assert np.array_equal(keep, expected)


def test_nwb_round_trip(tmp_path):
    cfg = SMALL.model_copy(update={"num_sessions": 1, "start_time": 1234.5})
    (path,) = write_simulated(cfg, tmp_path)
    assert path == tmp_path / "sim7_s0.nwb"
    s = simulate_session(cfg, 0)
    r = read_nwb(path)
    assert r.session_id == s.session_id and r.subject == s.subject
    assert r.unit_ids == s.unit_ids and r.brain_areas == s.brain_areas
    assert r.description == s.description
    assert np.array_equal(r.spike_times, s.spike_times)
    assert np.array_equal(r.spike_units, s.spike_units)
    assert set(r.behavior) == set(s.behavior)
    for name, b in s.behavior.items():
        assert np.array_equal(r.behavior[name].timestamps, b.timestamps)
        assert np.array_equal(r.behavior[name].data, b.data)
        assert r.behavior[name].unit == b.unit
    assert set(r.trials) == set(s.trials)
    for col, v in s.trials.items():
        assert np.array_equal(r.trials[col], v)
    assert np.allclose(r.domain, s.domain, rtol=0, atol=1e-9)


def test_shifted_keeps_float64_precision(small):
    s = small[0]
    far = s.shifted(36000.0)
    assert far.spike_times.dtype == np.float64
    back = far.spike_times - 36000.0
    assert np.abs(back - s.spike_times).max() < 1e-9
    # intervals survive (float32 would quantise them to ~2 ms at 36,000 s)
    assert np.abs(np.diff(far.spike_times) - np.diff(s.spike_times)).max() < 1e-9
    assert far.domain == (36000.0, 36030.0)
    assert np.abs(far.behavior["hand_vel"].timestamps - 36000.0 - 0.005)[0] < 1e-9
    # simulating with a start time gives exactly the shifted session
    late = simulate_session(SMALL.model_copy(update={"start_time": 36000.0}), 0)
    assert np.array_equal(late.spike_times, far.spike_times)
    assert np.array_equal(late.trials["start_time"], far.trials["start_time"])


def test_linear_decoder_learns_velocity(full):
    """Ridge on 5 lagged 50 ms bins, fit on the first 70%, scored on the last 30%."""
    lags, width = 5, 0.05
    vel = full.behavior["hand_vel"]
    ends, y = vel.timestamps[::5], vel.data[::5].astype(np.float64)
    ok = ends >= full.domain[0] + lags * width
    ends, y = ends[ok], y[ok]
    x = binned_counts(full.spike_times, full.spike_units, full.num_units, ends, width, lags)
    x = np.concatenate([x.reshape(len(ends), -1), np.ones((len(ends), 1))], axis=1)
    split = time_split(full)
    fit, test = ends < split.fit[1], ends >= split.test[0]
    reg = np.eye(x.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the intercept
    w = np.linalg.solve(x[fit].T @ x[fit] + 10.0 * reg, x[fit].T @ y[fit])
    assert r2_score(y[test], x[test] @ w) > 0.5


def test_config_validation():
    assert SimConfig().num_sessions == 3 and SimConfig().task == "mixed"
    with pytest.raises(ValidationError):
        SimConfig(baseline_rate_hz=(60.0, 2.0))
    with pytest.raises(ValidationError):
        SimConfig(task="reach")
    with pytest.raises(ValidationError):
        SimConfig(unknown_field=1)
    assert simulate_session(SimConfig(num_units=12, duration_s=5.0), 0).num_units == 12
