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


def rotary_phases(
    t: torch.Tensor, periods: torch.Tensor, dim_half: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the phases of times ``t`` (any shape, float64): (..., F) float32 each.

    With ``dim_half`` > F the result is padded to (..., dim_half) with cos = 1, sin = 0:
    those channel pairs carry content only and are never rotated.
    """
    t = t.to(torch.float64)
    frac = torch.remainder(t.unsqueeze(-1), periods) / periods  # (..., F) in [0, 1)
    angle = (2 * math.pi) * frac
    cos, sin = torch.cos(angle).to(torch.float32), torch.sin(angle).to(torch.float32)
    if dim_half is not None and dim_half > periods.numel():
        pad = dim_half - periods.numel()
        cos = torch.nn.functional.pad(cos, (0, pad), value=1.0)
        sin = torch.nn.functional.pad(sin, (0, pad), value=0.0)
    return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., H, Dh) by phases cos/sin (..., Dh/2), broadcast over heads.

    Channel pairs are (x[i], x[i + Dh/2]); the layout lets the rotation be two products
    and a flip, which is cheap forward and backward (no slicing into zero-filled grads).
    """
    half = cos.shape[-1]
    xs = x.unflatten(-1, (2, half))  # (..., H, 2, Dh/2)
    c = cos.unsqueeze(-2).unsqueeze(-2)  # (..., 1, 1, Dh/2)
    s = sin.unsqueeze(-2).unsqueeze(-2)
    sign = torch.tensor([-1.0, 1.0], dtype=x.dtype).view(2, 1)
    out = xs * c + xs.flip(-2) * (s * sign)
    return out.flatten(-2)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse rotation (rotate by -angle)."""
    return rotate(x, cos, -sin)
