"""The bias on the integer model's int32 grid."""

from __future__ import annotations

import torch


def bias_codes(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(b / s_b)`` (float64, half to even): the int32 bias of the integer model."""
    return torch.round(bias.detach().double() / scale.detach().double())


def quantize_bias(
    bias: torch.Tensor | None,
    input_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    refinement: int = 1,
) -> torch.Tensor | None:
    """``b_hat = s_b · round(b / s_b)`` with ``s_b = s_x s_w / refinement``, straight-through
    (``refinement``: a power of two, `QuantConfig.fine_bias_grid`).

    Jacob et al. 2018, section 2.4: the integer model adds the bias to the int32
    accumulator, so it is an int32 with scale ``s_x s_w`` (per output channel for
    per-channel weights) and zero point 0. The rounding moves the output by at most
    ``s_x s_w / 2``, far below an output step, but where that lands a value on the other
    side of a rounding boundary the fake-quant model and the deployed one differ by a
    step, and the difference propagates; rounding the bias here makes them compute the
    same sum. The gradient passes straight through.
    """
    if bias is None:
        return None
    # (a power of two: dividing by it is exact, as the export's scale s_w / refinement is)
    scale = (input_scale * weight_scale).to(bias.dtype) / refinement
    rounded = (bias_codes(bias, scale) * scale.double()).to(bias.dtype)
    if torch.is_grad_enabled() and bias.requires_grad:
        return _StraightThrough.apply(bias, rounded)
    return rounded  # inference: plain ops, for tracing and export


class _StraightThrough(torch.autograd.Function):
    """Forward: the rounded value, exactly; backward: the gradient of the unrounded one."""

    @staticmethod
    def forward(ctx, value, rounded):  # type: ignore[override]
        return rounded

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None
