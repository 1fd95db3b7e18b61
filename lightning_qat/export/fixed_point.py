"""Fixed-point requantization, Jacob et al. 2018 section 2.2.

A real multiplier ``M = s_x s_w / s_y`` is stored as ``M = M0 · 2^-31 · 2^-n`` with
``M0`` in [2^30, 2^31) (a Q31 int32 in [0.5, 1)) and an integer shift ``n``; ``M · acc``
is then an integer multiply and a rounding right shift. All integer arithmetic.

Rounding: once (default), half to even, over the full 64-bit product
``round(acc · M0 / 2^(31 + n))``: the rounding of torch's fake-quant kernels
(``nearbyint``) and, up to the float32 multiplier, of onnxruntime's QLinear kernels; TFLite
offers the same single rounding (``TFLITE_SINGLE_ROUNDING``). ``rounding="gemmlowp"``
rounds twice, as gemmlowp's ``SaturatingRoundingDoublingHighMul`` then
``RoundingDivideByPOT``: the first rounding leaves an error of up to ``2^-(n+1)`` that
the second can turn into a whole step, so about ``2^-n`` of the outputs land one step
away from the correctly rounded value (measured: 0.05% of a ResNet-18 layer's outputs
at ``n = 10``), and a step that differs propagates through the layers after it.
"""

from __future__ import annotations

import math

import torch

ROUNDINGS = ("nearest_even", "gemmlowp")


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
        # value = mantissa · 2^exponent, mantissa in [0.5, 1)
        mantissa, exponent = math.frexp(value)
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


def shift_round_half_even(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``round(x / 2^shift)``, ties to even, for int64 ``x`` and ``shift >= 1``."""
    shift = torch.as_tensor(shift, dtype=torch.int64)
    half = 1 << (shift - 1)
    floor = (x + half) >> shift  # round half up
    tie = (x & ((1 << shift) - 1)) == half
    return floor - (tie & (floor & 1).bool()).to(torch.int64)  # an odd result at a tie: down


def _div_trunc(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.div(x, d, rounding_mode="trunc")


def requantize(
    acc: torch.Tensor, m0: torch.Tensor, n: torch.Tensor, rounding: str = "nearest_even"
) -> torch.Tensor:
    """``round(M · acc)`` in integer arithmetic for ``M = M0 · 2^-31 · 2^-n`` (see the module
    docstring for ``rounding``). The accumulators are int32 values, so ``acc · M0`` fits
    in int64; a negative ``n`` (``M >= 1``) shortens the shift (gemmlowp: shifts the
    accumulator left first)."""
    acc = acc.to(torch.int64)
    n = torch.as_tensor(n, dtype=torch.int64)
    if rounding == "nearest_even":
        return shift_round_half_even(acc * m0, 31 + n)
    if rounding != "gemmlowp":
        raise ValueError(f"requantize(rounding={rounding!r}): use one of {ROUNDINGS}")
    left = torch.clamp(-n, min=0)
    acc = acc << left
    return rounding_right_shift(rounding_doubling_high_mul(acc, m0), torch.clamp(n, min=0))
