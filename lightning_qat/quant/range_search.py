"""Clipping ranges chosen for the least quantization error (MSE), and LSQ's initial step.

At 8 bits the full observed range costs little; at 4 bits and below, clipping the rare
large values buys a finer step for the many small ones, and the best trade-off is the
range whose fake-quantized tensor is closest to the tensor in mean squared error (Banner
et al. 2019, "Post training 4-bit quantization", section 3; the MSE initialisation that
LSQ+ uses, Bhalgat et al. 2020, section 3.3; NVIDIA pytorch-quantization's "mse"
calibrator). The search is a grid over the shrink factor ``α`` in ``(0, 1]`` of the full
range ``[α·min, α·max]``, per tensor or per channel.
"""

from __future__ import annotations

import math

import torch

from lightning_qat.quant.qparams import compute_qparams

#: Shrink factors tried by `mse_range`: 1/100 .. 1 (the full range).
SEARCH_STEPS = 100


@torch.no_grad()
def mse_range(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    ch_axis: int | None = None,
    steps: int = SEARCH_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``[α·min, α·max]`` of ``x`` whose quantization (`compute_qparams` on it,
    then ``s·(clamp(round(x/s) + z) - z)``) has the least squared error.

    Per tensor (0-d results) or, with ``ch_axis``, per channel (1-d). Ties keep the
    larger range. Exact on ``x`` (no histogram); costs ``steps`` fake-quant passes over
    it, so callers pass weights or a sample of activations.
    """
    values = x.detach().float()
    if ch_axis is None:
        values = values.reshape(1, -1)
    else:
        values = values.movedim(ch_axis, 0).reshape(values.shape[ch_axis], -1)
    low, high = values.amin(dim=1), values.amax(dim=1)
    best_error = torch.full_like(low, math.inf)
    best_low, best_high = low.clone(), high.clone()
    for step in range(steps, 0, -1):  # full range first: ties keep it
        alpha = step / steps
        scale, zero_point = compute_qparams(alpha * low, alpha * high, qmin, qmax, symmetric)
        codes = torch.clamp(torch.round(values / scale[:, None]) + zero_point[:, None], qmin, qmax)
        error = ((codes - zero_point[:, None]) * scale[:, None] - values).square().sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_low = torch.where(better, alpha * low, best_low)
        best_high = torch.where(better, alpha * high, best_high)
    if ch_axis is None:
        return best_low[0], best_high[0]
    return best_low, best_high


@torch.no_grad()
def lsq_initial_scale(
    x: torch.Tensor, positive_levels: int, ch_axis: int | None = None
) -> torch.Tensor:
    """``s = 2 mean(|x|) / sqrt(Qp)``, LSQ's initial step size (Esser et al. 2019,
    section 2.1), per tensor or per channel along ``ch_axis``; ``Qp`` is
    ``positive_levels``."""
    values = x.detach().float().abs()
    mean = values.mean() if ch_axis is None else values.movedim(ch_axis, 0).flatten(1).mean(dim=1)
    return 2 * mean / math.sqrt(positive_levels)
