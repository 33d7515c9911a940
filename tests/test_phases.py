"""The numpy phase maths the engine runs (``model/phases.py``, no torch in the serving
process) equals the torch model's (``model/rotary.py``), bit for bit where both compute
the same float64 expressions, at t = 0 and ten hours later."""

from __future__ import annotations

import numpy as np
import torch

from bci_decoder.model import phases, rotary

F, DH = 12, 32  # 12 of the 16 channel pairs carry time


def _times() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 5, 400)
    return np.concatenate([t, t + 36_000.0, [0.0, 1e-4, 8.0, 123456.789]])


def test_periods_equal():
    np.testing.assert_array_equal(
        phases.rotary_periods(F, 2e-3, 8.0), rotary.rotary_periods(F, 2e-3, 8.0).numpy()
    )


def test_phase_rows_equal_rotary_phases():
    periods = phases.rotary_periods(F, 2e-3, 8.0)
    t = _times()
    cos, sin = rotary.rotary_phases(torch.from_numpy(t), torch.from_numpy(periods), DH // 2)
    rows = phases.phase_rows(t, periods, DH)
    np.testing.assert_array_equal(rows, torch.cat([cos, sin], -1).numpy())
    scratch, one = phases.PhaseScratch(periods, DH), phases.phase_rows(0.0, periods, DH)
    for ti in t[::37]:
        scratch.into(float(ti), one)
        np.testing.assert_array_equal(one, phases.phase_rows(ti, periods, DH))


def test_float32_cos_sin_within_float32_rounding_of_rotary_phases():
    """The offline chunk graph's spike phases (float32 cos/sin of the float64-reduced
    angle) differ from the one phase function's by float32 rounding only, at t = 36,000 s
    too."""
    periods = phases.rotary_periods(F, 2e-3, 8.0)
    t = np.concatenate([_times(), np.random.default_rng(1).uniform(0, 3600, 20_000)])
    cos, sin = rotary.rotary_phases(torch.from_numpy(t), torch.from_numpy(periods))
    c32, s32 = phases.cos_sin_float32(t, periods)
    assert c32.dtype == s32.dtype == np.float32 and c32.shape == (t.size, F)
    for got, want in ((c32, cos.numpy()), (s32, sin.numpy())):
        assert np.abs(got - want).max() <= 3e-7  # the angle cast: half an ulp of 2π
        assert np.abs(got - want).mean() < 1e-7


def test_rotate_rows_equals_rotate():
    periods = phases.rotary_periods(F, 2e-3, 8.0)
    t = _times()
    x = np.random.default_rng(1).normal(size=(t.size, 2, DH)).astype(np.float32)
    cos, sin = rotary.rotary_phases(torch.from_numpy(t), torch.from_numpy(periods), DH // 2)
    want = rotary.rotate(torch.from_numpy(x), cos, sin).numpy()
    got = x.copy()
    phases.rotate_rows(got, t, periods)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(got - x).max() > 0.1  # it rotated


def test_rotation_depends_on_time_differences_only():
    """A key and a query rotated at times 10 hours later score as at t = 0."""
    periods = phases.rotary_periods(F, 2e-3, 8.0)
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(2, 1, 1, DH)).astype(np.float32)
    scores = []
    for shift in (0.0, 36_000.0):
        qq, kk = q.copy(), k.copy()
        phases.rotate_rows(qq, np.array([1.25 + shift]), periods)
        phases.rotate_rows(kk, np.array([1.0 + shift]), periods)
        scores.append(float((qq * kk).sum()))
    assert abs(scores[0] - scores[1]) <= 1e-5 * max(1.0, abs(scores[0]))


def test_rotation_rows_rotate_elementwise_like_rotate_rows():
    """The chunk graph's elementwise rotation, x ⊙ C + swap(x) ⊙ S with
    ``rotation_rows``' C and S, rotates like ``rotate_rows`` (float32 rounding apart)."""
    periods = phases.rotary_periods(F, 2e-3, 8.0)
    t = _times()
    x = np.random.default_rng(1).normal(size=(t.size, 2, DH)).astype(np.float32)
    want = x.copy()
    phases.rotate_rows(want, t, periods)
    c, s = phases.rotation_rows(t, periods, DH)  # (m, Dh) each
    swap = np.concatenate([x[..., DH // 2 :], x[..., : DH // 2]], -1)
    got = x * c[:, None] + swap * s[:, None]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(got - x).max() > 0.1  # it did rotate
