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

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qat.export.fixed_point import quantize_multiplier, requantize
from lightning_qat.nn import QUANTIZED_LAYERS, FoldedBatchNorm2d, QuantConv2d, QuantConvBn2d
from lightning_qat.quant import FakeQuantize, compute_qparams

PASS_THROUGH = (nn.Flatten, nn.Identity, nn.Dropout, FoldedBatchNorm2d)


def _leaves(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of a (nested) Sequential in call order."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        for child in model:
            yield from _leaves(child)
    else:
        yield model


def _codes(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / s) + z, qmin, qmax)`` as int64 (round half to even, as torch)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int64)


class QuantizeInput(nn.Module):
    """Float input to integer codes on the first layer's input grid."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int):
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _codes(x.double(), self.scale, self.zero_point, self.qmin, self.qmax)


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


def _input_grid(quantizer: FakeQuantize) -> tuple[float, int, int, int]:
    if not torch.isfinite(quantizer.observer.min_val).all():
        raise ValueError(
            f"{quantizer.observer.name or 'a layer'} never observed its input: train or "
            "calibrate the model before exporting"
        )
    return (
        float(quantizer.scale),
        int(quantizer.zero_point),
        quantizer.quant_min,
        quantizer.quant_max,
    )


def _weight_and_bias(
    layer: nn.Module, following_bn: nn.BatchNorm2d | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, FakeQuantize]:
    """Float weight and bias as the integer layer computes them, and the weight's
    per-channel scale and zero point. An unfolded BatchNorm after the layer is folded in
    here and the folded weight re-quantized with ranges from its own values."""
    quantizer = layer.weight_quantizer
    if isinstance(layer, QuantConvBn2d):
        factor = layer.fold_factor()
        weight, bias = layer.weight_to_quantize(), layer.folded_bias(factor)
    else:
        weight = layer.weight
        bias = layer.bias if layer.bias is not None else torch.zeros(weight.shape[0])
    if quantizer.observer_enabled:
        quantizer(weight)  # the scales of the current weights, as an eval forward computes
    scale, zero_point = quantizer.scale, quantizer.zero_point
    if following_bn is not None:
        bn = following_bn
        factor = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = weight * factor.reshape(-1, *[1] * (weight.dim() - 1))
        bias = bn.bias + (bias - bn.running_mean) * factor
        dims = tuple(range(1, weight.dim()))
        low = weight.amin(dim=dims) if quantizer.per_channel else weight.min()
        high = weight.amax(dim=dims) if quantizer.per_channel else weight.max()
        scale, zero_point = compute_qparams(
            low, high, quantizer.quant_min, quantizer.quant_max, quantizer.symmetric
        )
    return weight.detach(), bias.detach(), scale, zero_point, quantizer


@torch.no_grad()
def to_integer(model: nn.Module) -> IntegerModel:
    """The integer-only equivalent of a trained QAT ``model`` (see the module docstring).

    Raises:
        ValueError: a module the integer model cannot run (a float layer between
            quantized ones, an unfolded BatchNorm not right after a quantized conv), or a
            layer that never observed its input.
    """
    leaves = list(_leaves(model))
    steps: list[nn.Module] = []
    grid: tuple[float, int, int, int] | None = None  # current codes' (s, z, qmin, qmax)
    skip = set()
    for index, module in enumerate(leaves):
        if index in skip or isinstance(module, PASS_THROUGH):
            if isinstance(module, nn.Flatten):
                steps.append(nn.Flatten(module.start_dim, module.end_dim))
            continue
        if isinstance(module, QUANTIZED_LAYERS):
            s_in, z_in, qmin, qmax = _input_grid(module.activation_quantizer)
            if grid is None:
                if steps:
                    raise ValueError(
                        f"to_integer: {type(steps[-1]).__name__} runs in float before the "
                        "first quantized layer; only the input may be float"
                    )
                steps.append(QuantizeInput(s_in, z_in, qmin, qmax))
            following = leaves[index + 1] if index + 1 < len(leaves) else None
            bn = following if type(following) is nn.BatchNorm2d else None
            if bn is not None:
                if not isinstance(module, QuantConv2d) or isinstance(module, QuantConvBn2d):
                    raise ValueError("to_integer: an unfolded BatchNorm must follow a QuantConv2d")
                skip.add(index + 1)
            weight, bias, s_w, z_w, wq = _weight_and_bias(module, bn)
            shape = (-1, *[1] * (weight.dim() - 1))
            w_codes = _codes(
                weight, s_w.reshape(shape), z_w.reshape(shape), wq.quant_min, wq.quant_max
            ) - z_w.reshape(shape).to(torch.int64)
            acc_scale = (s_in * s_w.double()).expand(weight.shape[0])
            bias_q = torch.round(bias.double() / acc_scale).to(torch.int64)
            next_layer = next(
                (m for m in leaves[index + 1 :] if isinstance(m, QUANTIZED_LAYERS)), None
            )
            if next_layer is not None:
                s_out, z_out, out_min, out_max = _input_grid(next_layer.activation_quantizer)
                m0, shift = quantize_multiplier(acc_scale / s_out)
                requant, dequant = (m0, shift, z_out, out_min, out_max), None
                grid = (s_out, z_out, out_min, out_max)
            else:
                requant, dequant = None, acc_scale.float()
                grid = "float"
            conv_args = {}
            if weight.dim() == 4:
                if module.padding_mode != "zeros":
                    raise ValueError("to_integer supports zero padding only")
                conv_args = dict(
                    stride=module.stride,
                    padding=module.padding,
                    dilation=module.dilation,
                    groups=module.groups,
                )
            steps.append(
                IntegerLayer(
                    "conv" if weight.dim() == 4 else "linear",
                    w_codes,
                    bias_q,
                    z_in,
                    conv_args,
                    requant,
                    dequant,
                )
            )
        elif isinstance(module, nn.ReLU):
            steps.append(IntegerReLU(None if grid in (None, "float") else grid[1]))
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d | nn.AdaptiveAvgPool2d):
            steps.append(IntegerPool(module, integer=grid not in (None, "float")))
        else:
            raise ValueError(
                f"to_integer: cannot run {type(module).__name__} in integer arithmetic "
                "(supported: quantized Conv2d/Linear, ReLU, max/average pooling, Flatten; "
                "an unfolded BatchNorm right after a quantized conv)"
            )
    if grid is None:
        raise ValueError("to_integer found no quantized layer: convert with prepare_qat first")
    return IntegerModel(*steps)


@torch.no_grad()
def evaluate_integer(
    integer: IntegerModel, model: nn.Module, loader, max_batches: int | None = None
) -> dict[str, float | int]:
    """Test accuracy of ``integer`` and how often its top-1 equals ``model``'s, over the
    (input, label) batches of ``loader`` (the first ``max_batches`` if given)."""
    hits = agree = seen = 0
    device = next(model.parameters()).device
    for index, (x, y) in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        x = x.to(device)
        predicted = integer(x).argmax(1).cpu()
        hits += int((predicted == y).sum())
        agree += int((predicted == model(x).argmax(1).cpu()).sum())
        seen += len(y)
    if not seen:
        raise ValueError("evaluate_integer: the loader gave no batch")
    return {
        "integer_test_acc": hits / seen,
        "integer_agreement": agree / seen,
        "integer_test_images": seen,
    }
