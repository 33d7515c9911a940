"""Rotary phases in numpy: the serving side's copy of ``model/rotary.py``'s maths.

angle = 2π · (t mod P) / P, with ``t mod P`` taken in float64 before the angle, so a key
rotated at t = 36,000 s is as exact as one rotated at t = 0 (ARCHITECTURE "Time").
``tests/test_phases.py`` holds every function here equal to its torch counterpart, so the
engine (numpy, no torch in the serving process) and the model (torch) rotate alike.

Layout: a head's Dh channels are pairs (x[i], x[i + Dh/2]); the first F of the Dh/2
pairs carry time, the rest are never rotated (cos = 1, sin = 0).
"""

from __future__ import annotations

import math

import numpy as np


def rotary_periods(num_freqs: int, min_period: float, max_period: float) -> np.ndarray:
    """(F,) float64 periods, log-spaced, bit-identical to ``rotary.rotary_periods``
    (``torch.logspace`` steps from the start for the first half and from the end for the
    second; ``np.logspace`` differs by an ulp). Packages store the model's own periods."""
    lo, hi = math.log10(min_period), math.log10(max_period)
    if num_freqs == 1:
        return np.array([10.0**lo])
    step = (hi - lo) / (num_freqs - 1)
    i = np.arange(num_freqs)
    exponent = np.where(i < num_freqs // 2, lo + step * i, hi - step * (num_freqs - 1 - i))
    return np.power(10.0, exponent)


def angles(t: np.ndarray | float, periods: np.ndarray, out: np.ndarray | None = None):
    """float64 angles (..., F) of times t (...): 2π · (t mod P) / P."""
    t = np.asarray(t, dtype=np.float64)
    if out is None:
        out = np.empty((*t.shape, periods.size))
    np.remainder(t[..., None], periods, out=out)
    np.divide(out, periods, out=out)
    np.multiply(out, 2 * math.pi, out=out)
    return out


def cos_sin_float32(t: np.ndarray, periods: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (..., F) float32 of times t (...): the angle reduced in float64
    (``angles``), then cos and sin taken in float32, with numpy's SIMD float32 kernels:
    13x faster than float64's (4.1 -> 0.3 ms for a chunk of 41 groups x 230 spikes on
    this EPYC VM), within 3e-7 of the float64 values rounded (the angle's cast to
    float32: half an ulp of 2π), which ``test_phases`` holds. For the offline chunk graph's spikes, where float64 cos/sin
    took 7% of decoding; per-step phases stay float64-exact."""
    ang = angles(t, periods).astype(np.float32)
    return np.cos(ang), np.sin(ang)


def phase_rows(t: np.ndarray | float, periods: np.ndarray, dim_head: int) -> np.ndarray:
    """[cos | sin] (..., Dh) float32 of times t (...), unrotated pairs at angle 0: the
    ``phase`` inputs of the step graphs."""
    ang = angles(t, periods)
    half, F = dim_head // 2, periods.size
    out = np.zeros((*ang.shape[:-1], dim_head), np.float32)
    out[..., :half] = 1.0
    out[..., :F] = np.cos(ang)
    out[..., half : half + F] = np.sin(ang)
    return out


def rotation_rows(
    t: np.ndarray, periods: np.ndarray, dim_head: int
) -> tuple[np.ndarray, np.ndarray]:
    """C = [cos | cos] and S = [-sin | sin] (..., Dh) float32 of times t (...), 1 and 0
    on the unrotated pairs: x rotated at t is x ⊙ C + swap(x) ⊙ S, swap exchanging the
    halves of each head (the offline chunk graph's elementwise rotation)."""
    ang = angles(t, periods)
    half, F = dim_head // 2, periods.size
    c = np.ones((*ang.shape[:-1], dim_head), np.float32)
    s = np.zeros((*ang.shape[:-1], dim_head), np.float32)
    c[..., :F] = np.cos(ang)
    c[..., half : half + F] = c[..., :F]
    s[..., half : half + F] = np.sin(ang)
    s[..., :F] = -s[..., half : half + F]
    return c, s


class PhaseScratch:
    """``phase_rows`` of one time into a preallocated row, without allocating: the
    per-step phases of the decode loop."""

    def __init__(self, periods: np.ndarray, dim_head: int) -> None:
        self.periods, self.F, self.half = periods, periods.size, dim_head // 2
        self._ang = np.zeros(self.F)

    def into(self, t: float, out: np.ndarray) -> None:
        """[cos | sin] of time t into out (Dh,) float32 (its unrotated pairs untouched)."""
        ang, F, h = self._ang, self.F, self.half
        np.remainder(t, self.periods, out=ang)
        np.divide(ang, self.periods, out=ang)
        np.multiply(ang, 2 * math.pi, out=ang)
        # float64 cos/sin cast into the float32 row: what phase_rows' assignment does
        np.cos(ang, out=out[:F])
        np.sin(ang, out=out[h : h + F])


def rotate_rows(x: np.ndarray, t: np.ndarray, periods: np.ndarray) -> None:
    """Rotate rows x (m, H, Dh) float32 in place at times t (m,) (``rotary.rotate`` with
    ``rotary_phases``' float32 cos/sin)."""
    RowRotation(periods, x.shape[-1])(x, t)


class RowRotation:
    """``rotate_rows`` for one set of periods and head size, in 8 numpy calls instead of
    16: each rotated pair (a, b) is viewed as one (2, F) block, so
    [a, b] <- [a, b]·cos + [b, a]·[-sin, sin] is a product with the block reversed, a
    product in place and a sum. The engine rotates every pushed chunk with it: measured
    (2-core EPYC VM, 20 spikes x 2 heads x Dh 32) 36 µs -> 12 µs per chunk."""

    def __init__(self, periods: np.ndarray, dim_head: int) -> None:
        self.periods, self.F, self.half = periods, periods.size, dim_head // 2
        self._scale = 2 * math.pi / periods  # float64; an ulp from dividing, then 2π

    def __call__(self, x: np.ndarray, t: np.ndarray) -> None:
        m, F = t.size, self.F
        if m == 0:
            return
        ang = np.remainder(t[:, None], self.periods)  # (m, F) float64 t mod P first
        ang *= self._scale
        cs = np.empty((m, 1, 3, F), np.float32)  # [cos, -sin, sin], float32 like rotate
        np.cos(ang, out=cs[:, 0, 0])
        np.sin(ang, out=cs[:, 0, 2])
        np.negative(cs[:, 0, 2], out=cs[:, 0, 1])
        pairs = x.reshape(m, -1, 2, self.half)[..., :F]  # (m, H, 2, F) views of (a, b)
        swapped = pairs[:, :, ::-1] * cs[:, :, 1:]  # [-b·sin, a·sin]
        pairs *= cs[:, :, :1]
        pairs += swapped
