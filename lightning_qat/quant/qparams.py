"""Quantization parameters (scale, zero point) from an observed range.

Affine quantization, Jacob et al. 2018 (arXiv 1712.05877, section 2.1) and Krishnamoorthi
2018 (arXiv 1806.08342, "the whitepaper", section 2)::

    q     = clamp(round(x / s) + z, qmin, qmax)
    x_hat = s * (q - z)

``round`` is round-half-to-even (``torch.round`` and the fused fake-quant kernels).
"""

from __future__ import annotations

import torch

#: Smallest scale handed out. A constant or all-zero tensor has an empty range; a zero
#: scale would divide by zero in ``x / s``, so it gets this one (as torch.ao observers do).
MIN_SCALE = torch.finfo(torch.float32).eps


def quant_range(bits: int, symmetric: bool, narrow_range: bool = True) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a signed ``bits``-bit code.

    Symmetric uses the narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (-127..127 at 8 bits)
    so that the product of two int8 codes never reaches -128 * -128 and int8 x int8
    products accumulate safely in int32 (whitepaper section 2.2). Asymmetric uses the full
    range ``[-2^(b-1), 2^(b-1) - 1]``; it is the uint8 code shifted by 2^(b-1), the same
    grid with the zero point shifted by the same amount.

    ``narrow_range=False`` gives a symmetric grid (zero point 0) the full range too, as LSQ
    quantizes signed data (``-Qn = -2^(b-1)``, ``Qp = 2^(b-1) - 1``; Esser et al. 2019,
    section 2): the extra negative code is a quarter of the levels at 2 bits (-2, -1, 0, 1
    instead of the ternary -1, 0, 1) and matters little at 8.
    """
    half = 2 ** (bits - 1)
    if symmetric and narrow_range:
        return -(half - 1), half - 1
    return -half, half - 1


def compute_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) for the range ``[min_val, max_val]``.

    Element-wise, so per-tensor (0-d) and per-channel (1-d) ranges use the same code.
    The range is first widened to contain 0, so 0.0 is exactly representable (zero
    padding and ReLU stay exact; Jacob et al. section 2.1):

    - asymmetric: ``s = (max - min) / (qmax - qmin)``,
      ``z = clamp(round(qmin - min / s), qmin, qmax)``
    - symmetric:  ``s = max(|min|, |max|) / qmax``, ``z = 0``

    A non-finite bound (an observer that has seen nothing) counts as 0, and the scale is
    at least ``MIN_SCALE``: degenerate input never yields a NaN, Inf or zero scale.
    """
    min_val = torch.nan_to_num(min_val.float(), nan=0.0, posinf=0.0, neginf=0.0)
    max_val = torch.nan_to_num(max_val.float(), nan=0.0, posinf=0.0, neginf=0.0)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-min_neg, max_pos) / qmax, min=MIN_SCALE)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_pos - min_neg) / (qmax - qmin), min=MIN_SCALE)
        zero_point = torch.clamp(torch.round(qmin - min_neg / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point
