"""Spiking scores agree with nlb_tools (the Neural Latents Benchmark's own code) to 1e-9.

nlb_tools is a test-only dependency (installed by `make test`); without it these tests skip
locally and fail in CI. Its ``neg_log_likelihood`` writes 1e-9 into the rates it is given
when no spike is NaN, so every call below hands it copies.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

from bci_decoder.metrics import (
    bits_per_spike,
    co_smoothing_bps,
    forward_prediction_bps,
    poisson_nll,
    psth_r2,
)


def _nlb_evaluation():
    try:
        return importlib.import_module("nlb_tools.evaluation")
    except ImportError as err:
        msg = f"nlb_tools is not installed ({err}); `make test` installs it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def nlb():
    return _nlb_evaluation()


def _nlb_bps(nlb, rates: np.ndarray, spikes: np.ndarray) -> float:
    return float(nlb.bits_per_spike(rates.copy(), spikes.copy()))


def _trials(seed: int = 0, shape: tuple[int, ...] = (12, 40, 9)) -> tuple[np.ndarray, np.ndarray]:
    """Poisson spikes (trials, time, neurons) and noisy rate predictions near the truth."""
    rng = np.random.default_rng(seed)
    true = rng.gamma(2.0, 0.15, size=shape) * rng.uniform(0.2, 3.0, size=shape[-1])
    spikes = rng.poisson(true).astype(np.float64)
    rates = true * rng.lognormal(0.0, 0.3, size=shape)
    return rates, spikes


def test_bits_per_spike_matches_nlb(nlb) -> None:
    rates, spikes = _trials()
    ours = bits_per_spike(rates, spikes)
    assert ours == pytest.approx(_nlb_bps(nlb, rates, spikes), abs=1e-9)
    assert ours > 0.05  # rates near the truth carry information over the mean-rate null


def test_bits_per_spike_2d_and_null_is_zero(nlb) -> None:
    rates, spikes = _trials(1, (500, 6))  # (time, neurons)
    assert bits_per_spike(rates, spikes) == pytest.approx(_nlb_bps(nlb, rates, spikes), abs=1e-9)
    null = np.broadcast_to(spikes.mean(0), spikes.shape)
    assert bits_per_spike(null, spikes) == pytest.approx(0.0, abs=1e-12)


def test_bits_per_spike_nan_and_edge_cases_match_nlb(nlb) -> None:
    """NaN spike counts (scattered, whole rows, a whole neuron), NaN rates where the count
    is NaN, a silent neuron (null rate 0) and zero predicted rates."""
    rng = np.random.default_rng(2)
    rates, spikes = _trials(2)
    scattered = rng.random(spikes.shape) < 0.1
    spikes[scattered] = np.nan
    rates[scattered & (rng.random(spikes.shape) < 0.5)] = np.nan  # unobserved: may be NaN
    spikes[3, 5:9, :] = np.nan  # all-NaN rows (bins after a trial's end)
    spikes[7, 30:, :] = np.nan
    spikes[:, :, 4] = np.nan  # a neuron never observed
    rates[:, :, 4] = np.nan
    spikes[:, :, 2] = np.where(np.isnan(spikes[:, :, 2]), np.nan, 0.0)  # a silent neuron
    rates[0, :10, 0] = 0.0  # zero predictions, scored as 1e-9
    rates[:, :, 6] = np.where(np.isnan(spikes[:, :, 6]), rates[:, :, 6], 0.0)
    ours = bits_per_spike(rates, spikes)
    theirs = _nlb_bps(nlb, rates, spikes)
    assert np.isfinite(ours)
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_bits_per_spike_leaves_inputs_alone() -> None:
    rates, spikes = _trials(3)
    rates[0, 0, :] = 0.0
    before = rates.copy()
    bits_per_spike(rates, spikes)
    np.testing.assert_array_equal(rates, before)


def test_poisson_nll_matches_nlb(nlb) -> None:
    rates, spikes = _trials(4)
    spikes[1, :3] = np.nan
    theirs = float(nlb.neg_log_likelihood(rates.copy(), spikes.copy()))
    assert poisson_nll(rates, spikes) == pytest.approx(theirs, rel=1e-12)


def _set(array: np.ndarray, value: float) -> np.ndarray:
    array[0, 0, 0] = value
    return array


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r, s: (_set(r, np.nan), s), "NaN rate"),
        (lambda r, s: (_set(r, -0.1), s), "negative rate"),
        (lambda r, s: (r[:, :, :-1], s), "one shape"),
        (lambda r, s: (r, np.where(np.isnan(s), np.nan, 0.0)), "without spikes"),
    ],
)
def test_bits_per_spike_refuses_bad_input(change, message: str) -> None:
    rates, spikes = _trials(5)
    rates, spikes = change(rates, spikes)
    with pytest.raises(ValueError, match=message):
        bits_per_spike(rates, spikes)


def test_co_smoothing_and_forward_prediction_match_nlb(nlb) -> None:
    """As nlb_tools.evaluation.evaluate scores them: co-bps on the held-out units alone,
    fp-bps on held-in and held-out units joined (np.dstack) with one null."""
    rates, spikes = _trials(6, (10, 30, 12))
    held_in, held_out = slice(0, 9), slice(9, 12)
    co = co_smoothing_bps(rates[..., held_out], spikes[..., held_out])
    assert co == pytest.approx(_nlb_bps(nlb, rates[..., held_out], spikes[..., held_out]), abs=1e-9)
    f_rates, f_spikes = _trials(7, (10, 8, 12))  # the bins after each window
    fp = forward_prediction_bps(
        f_rates[..., held_in],
        f_spikes[..., held_in],
        f_rates[..., held_out],
        f_spikes[..., held_out],
    )
    joined = _nlb_bps(
        nlb,
        np.dstack([f_rates[..., held_in], f_rates[..., held_out]]),
        np.dstack([f_spikes[..., held_in], f_spikes[..., held_out]]),
    )
    assert fp == pytest.approx(joined, abs=1e-9)
    # Scoring the held-in units alone is a different number: the join is not a no-op.
    assert abs(forward_prediction_bps(f_rates[..., held_in], f_spikes[..., held_in]) - fp) > 1e-6
    with pytest.raises(ValueError, match="both"):
        forward_prediction_bps(f_rates, f_spikes, heldout_rates=f_rates)


def test_psth_r2_matches_nlb(nlb) -> None:
    """Conditions of different lengths (NaN-padded PSTHs), an empty condition, trial
    jitter both ways, and a constant unit (scikit-learn's rule: 0 unless exact)."""
    rng = np.random.default_rng(8)
    conds, bins, units, per = 4, 25, 7, 6
    psth = rng.gamma(2.0, 0.2, size=(conds, bins, units))
    psth[1, 20:] = np.nan  # a shorter condition
    psth[:, :, 5] = np.where(np.isnan(psth[:, :, 0]), np.nan, 0.5)  # constant unit (exact mean)
    cond_trials = [np.arange(c * per, (c + 1) * per) for c in range(conds)]
    cond_trials[3] = np.array([], dtype=int)
    rates = np.repeat(np.nan_to_num(psth), per, axis=0)  # (trials, T, N)
    rates = rates + rng.normal(0.0, 0.05, size=rates.shape)
    jitter = np.zeros(len(rates), dtype=int)
    jitter[2] = 1
    jitter[8] = -2
    # Jittered trials must still cover the PSTH's bins: pad with NaN outside them.
    psth[0, :1] = np.nan
    psth[1, 18:] = np.nan
    ours = psth_r2(psth, rates, cond_trials, jitter)
    theirs = float(nlb.eval_psth(psth, rates, cond_trials, jitter=jitter))
    assert ours == pytest.approx(theirs, abs=1e-9)
    assert 0.0 < ours < 1.0
    assert psth_r2(psth, rates, cond_trials) == pytest.approx(
        float(nlb.eval_psth(psth, rates, cond_trials)), abs=1e-9
    )


def test_psth_r2_refuses_nan_inside_a_condition() -> None:
    psth = np.ones((1, 10, 3))
    rates = np.ones((2, 10, 3))
    with pytest.raises(ValueError, match="NaN predicted"):
        psth_r2(psth, rates, [np.array([0, 1])], jitter=np.array([2, 0]))
