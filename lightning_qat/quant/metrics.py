"""Measures of quantization error."""

from __future__ import annotations

import math

import torch


def sqnr_db(signal: torch.Tensor, quantized: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(Σ x² / Σ (x - x̂)²)`` in dB.

    About 6.02 dB per bit for a uniform quantizer over a full-scale uniform signal
    (Bennett 1948); ``inf`` when quantization is exact.
    """
    signal = signal.detach().float()
    noise = (signal - quantized.detach().float()).pow(2).sum().item()
    power = signal.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if power == 0:
        return -math.inf
    return 10 * math.log10(power / noise)


def zeroed_channels(weight: torch.Tensor, quantized: torch.Tensor, ch_axis: int = 0) -> list[int]:
    """Output channels along ``ch_axis`` whose weights are not all zero but quantize to all
    zeros: channels a step size larger than twice their largest weight has switched off
    (nothing a pruned, all-zero channel is counted for)."""
    weight = weight.detach().movedim(ch_axis, 0).flatten(1)
    quantized = quantized.detach().movedim(ch_axis, 0).flatten(1)
    zeroed = (quantized == 0).all(dim=1) & (weight != 0).any(dim=1)
    return zeroed.nonzero().flatten().tolist()
