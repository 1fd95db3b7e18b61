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
