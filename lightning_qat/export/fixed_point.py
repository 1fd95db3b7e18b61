"""Fixed-point requantization, Jacob et al. 2018 section 2.2 (gemmlowp's arithmetic).

A real multiplier ``M = s_x s_w / s_y`` in (0, 1) is stored as ``M = M0 · 2^-n`` with
``M0`` in [0.5, 1) held as a Q31 int32; ``M · acc`` is then a rounding doubling high
multiply by ``M0`` followed by a rounding right shift by ``n``. All integer arithmetic.
"""

from __future__ import annotations

import math

import torch


def quantize_multiplier(multiplier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M0, n)`` int64 tensors with ``M ≈ M0 / 2^31 · 2^-n``, ``M0`` in [2^30, 2^31).

    Multipliers of 1 or more take a negative ``n`` (a left shift), which the integer
    model supports too; zero maps to ``M0 = 0``.
    """
    m0, n = [], []
    for value in multiplier.double().flatten().tolist():
        if value <= 0:
            m0.append(0)
            n.append(0)
            continue
        mantissa, exponent = math.frexp(
            value
        )  # value = mantissa · 2^exponent, mantissa in [0.5, 1)
        q = round(mantissa * (1 << 31))
        if q == 1 << 31:  # rounding reached 1.0
            q //= 2
            exponent += 1
        m0.append(q)
        n.append(-exponent)
    shape = multiplier.shape
    return (
        torch.tensor(m0, dtype=torch.int64).reshape(shape),
        torch.tensor(n, dtype=torch.int64).reshape(shape),
    )


def rounding_doubling_high_mul(acc: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
    """``round(acc · M0 / 2^31)``, ties towards +infinity, bit for bit as gemmlowp's
    SaturatingRoundingDoublingHighMul (int32 accumulators times a Q31 multiplier fit in
    int64, so nothing saturates here)."""
    product = acc.to(torch.int64) * m0
    nudge = torch.where(product >= 0, 1 << 30, 1 - (1 << 30))
    return _div_trunc(product + nudge, 1 << 31)


def rounding_right_shift(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``round(x / 2^n)`` for ``n >= 0``, ties away from zero (gemmlowp's
    RoundingDivideByPOT)."""
    right = torch.as_tensor(n, dtype=torch.int64)
    mask = (1 << right) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> right) + (remainder > threshold).to(torch.int64)


def _div_trunc(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.div(x, d, rounding_mode="trunc")


def requantize(acc: torch.Tensor, m0: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``round(M · acc)`` in integer arithmetic for ``M = M0 · 2^-31 · 2^-n``; a negative
    ``n`` (``M >= 1``) shifts the accumulator left first, as gemmlowp does."""
    left = torch.clamp(-n, min=0)
    acc = acc.to(torch.int64) << left
    return rounding_right_shift(rounding_doubling_high_mul(acc, m0), torch.clamp(n, min=0))
