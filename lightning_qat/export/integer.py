"""Integer-only inference reference (Jacob et al. 2018, section 2.2).

`to_integer` turns a trained QAT model (an ``nn.Sequential``, possibly nested, of
quantized Conv/Linear layers, ReLU, pooling and Flatten, as LeNet and NIN) into an
`IntegerModel`: the input is quantized once; every layer then computes
``acc = Σ (q_x - z_x)(q_w - z_w) + b_q`` with int8/uint8 codes and an int32 bias of scale
``s_x s_w``, and requantizes with a Q31 fixed-point multiplier and a rounding shift to
the next layer's input grid (ReLU is a clamp at its zero point, max-pooling commutes
with quantization). The last quantized layer's accumulator is dequantized: the only
floating point after the input quantization.

The accumulations are exact integer arithmetic; PyTorch has no integer convolution on
CPU, so they run in float64 on integer values (exact below 2^53, far above the int32
range of any int8 layer). It is a reference for the numbers, not a fast runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qat.export import plan
from lightning_qat.export.fixed_point import quantize_multiplier, requantize
from lightning_qat.export.plan import plan_deployment


class QuantizeInput(nn.Module):
    """Float input to integer codes on the first layer's input grid."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int):
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plan.quantize_codes(x.double(), self.scale, self.zero_point, self.qmin, self.qmax)


class IntegerLayer(nn.Module):
    """One quantized Conv2d or Linear in integer arithmetic.

    Buffers: ``weight`` (q_w - z_w, int64 holding int8/uint8 differences), ``bias`` (int32
    values, scale ``s_x s_w``), and either the requantization ``m0``, ``shift`` to the
    next layer's ``(z_out, qmin, qmax)`` or the dequantization scale ``s_x s_w``.
    """

    def __init__(
        self,
        kind: str,
        weight: torch.Tensor,
        bias: torch.Tensor,
        input_zero_point: int,
        conv_args: dict,
        requant: tuple[torch.Tensor, torch.Tensor, int, int, int] | None,
        dequant_scale: torch.Tensor | None,
    ):
        super().__init__()
        self.kind = kind
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.input_zero_point = input_zero_point
        self.conv_args = conv_args
        if requant is not None:
            m0, shift, self.output_zero_point, self.qmin, self.qmax = requant
            self.register_buffer("m0", m0)
            self.register_buffer("shift", shift)
        self.requantizes = requant is not None
        self.register_buffer("dequant_scale", dequant_scale)

    def accumulate(self, q: torch.Tensor) -> torch.Tensor:
        """int32 accumulator ``Σ (q_x - z_x)(q_w - z_w) + b_q`` (exact)."""
        x = (q - self.input_zero_point).double()
        w = self.weight.double()
        if self.kind == "conv":
            acc = F.conv2d(x, w, None, **self.conv_args)
            bias = self.bias.reshape(1, -1, 1, 1)
        else:
            acc = F.linear(x, w)
            bias = self.bias
        return acc.round().to(torch.int64) + bias

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        acc = self.accumulate(q)
        shape = (1, -1, 1, 1) if self.kind == "conv" else (1, -1)
        if not self.requantizes:
            return acc.double() * self.dequant_scale.reshape(shape)
        out = requantize(acc, self.m0.reshape(shape), self.shift.reshape(shape))
        return torch.clamp(out + self.output_zero_point, self.qmin, self.qmax)


class IntegerReLU(nn.Module):
    """ReLU on codes: a clamp at the zero point (the code of 0.0)."""

    def __init__(self, zero_point: int | None):
        super().__init__()
        self.zero_point = zero_point

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.zero_point is None:  # after the output dequantization
            return torch.relu(q)
        return torch.clamp(q, min=self.zero_point)


class IntegerPool(nn.Module):
    """Max pooling (commutes with quantization) or average pooling with a rounded
    integer mean on codes."""

    def __init__(self, pool: nn.Module, integer: bool):
        super().__init__()
        self.pool = pool
        self.integer = integer

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if not self.integer:
            return self.pool(q)
        out = self.pool(q.double())
        if isinstance(self.pool, nn.MaxPool2d):
            return out.to(torch.int64)
        # round half away from zero, as the fixed-point arithmetic
        return (torch.sign(out) * torch.floor(out.abs() + 0.5)).to(torch.int64)


class IntegerModel(nn.Sequential):
    """The integer-only model `to_integer` builds; its ``forward`` takes and returns float."""

    def codes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The integer tensor after every step (for comparisons with fake quantization)."""
        outputs = []
        for step in self:
            x = step(x)
            outputs.append(x)
        return outputs


def _integer_layer(layer: plan.QuantizedLayer) -> IntegerLayer:
    shape = (-1, *[1] * (layer.weight_codes.dim() - 1))
    weight = layer.weight_codes - layer.weight_zero_point.reshape(shape)
    requant = dequant = None
    if layer.output is not None:
        m0, shift = quantize_multiplier(layer.accumulator_scale / layer.output.scale)
        out = layer.output
        requant = (m0, shift, out.zero_point, out.qmin, out.qmax)
    else:
        dequant = layer.accumulator_scale.float()
    return IntegerLayer(
        layer.kind, weight, layer.bias, layer.input.zero_point, layer.conv_args, requant, dequant
    )


@torch.no_grad()
def to_integer(model: nn.Module) -> IntegerModel:
    """The integer-only equivalent of a trained QAT ``model`` (see the module docstring).

    The input is always quantized, also where training left the first layer's input float
    (``quantize_first_input=False``): an integer-only model has no float layer.

    Raises:
        ValueError: a module the integer model cannot run (a float layer between
            quantized ones, an unfolded BatchNorm not right after a quantized conv), or a
            layer that never observed its input.
    """
    steps: list[nn.Module] = []
    for step in plan_deployment(model):
        if isinstance(step, plan.QuantizeInput):
            grid = step.grid
            steps.append(QuantizeInput(grid.scale, grid.zero_point, grid.qmin, grid.qmax))
        elif isinstance(step, plan.QuantizedLayer):
            steps.append(_integer_layer(step))
        elif isinstance(step, plan.ReLU):
            steps.append(IntegerReLU(step.zero_point))
        elif isinstance(step, plan.Pool):
            steps.append(IntegerPool(step.module, integer=step.on_codes))
        else:
            steps.append(nn.Flatten(step.start_dim, step.end_dim))
    return IntegerModel(*steps)
