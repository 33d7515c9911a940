"""Rotary time embedding with float64-exact phases (the project's one phase function).

angle = 2π · (t mod P) / P for periods P log-spaced in [min_period, max_period]. The
modulo is taken in float64 *before* the angle, so a key rotated at t = 36,000 s is as
exact as one rotated at t = 0, and attention scores depend only on time differences.
"""

from __future__ import annotations

import math

import torch


def rotary_periods(num_freqs: int, min_period: float, max_period: float) -> torch.Tensor:
    """(F,) float64 periods, log-spaced."""
    return torch.logspace(
        math.log10(min_period), math.log10(max_period), num_freqs, dtype=torch.float64
    )


def rotary_phases(t: torch.Tensor, periods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the phases of times ``t`` (any shape, float64): (..., F) float32 each."""
    t = t.to(torch.float64)
    frac = torch.remainder(t.unsqueeze(-1), periods) / periods  # (..., F) in [0, 1)
    angle = (2 * math.pi) * frac
    return torch.cos(angle).to(torch.float32), torch.sin(angle).to(torch.float32)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2F channels of the last dim of x (..., H, Dh) by the phases
    cos/sin (..., F); channels beyond 2F carry content only and pass through.

    Pairs are (x[2i], x[2i+1]) laid out as two halves: x[:F] and x[F:2F].
    """
    f = cos.shape[-1]
    c = cos.unsqueeze(-2)  # (..., 1, F) broadcast over heads
    s = sin.unsqueeze(-2)
    x1 = x[..., :f]
    x2 = x[..., f : 2 * f]
    rest = x[..., 2 * f :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse rotation (rotate by -angle)."""
    return rotate(x, cos, -sin)
