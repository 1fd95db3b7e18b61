"""What a trained QAT model deploys as: a list of integer steps, shared by every exporter.

`plan_deployment` walks a QAT model made of quantized Conv2d/Linear layers, ReLU,
pooling and Flatten in (nested) ``nn.Sequential`` (LeNet, NIN) and returns the steps of
Jacob et al. 2018's integer-only model (section 2.2), with every number already on its
integer grid:

- `QuantizeInput`: the float input to codes on the first layer's input grid;
- `QuantizedLayer`: weight codes (BN folded in), an int32 bias of scale ``s_x s_w`` and
  zero point 0, the input grid and the grid its output is requantized to (the next
  quantized layer's input grid), or ``None`` for the last layer, whose accumulator is
  dequantized to float;
- `ReLU` (a clamp at the zero point on codes), `Pool` (max pooling commutes with
  quantization) and `Flatten`.

`to_integer` (the exact reference) and `to_onnx` (onnxruntime's int8 kernels) both read
this plan, so they deploy the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_qat.nn import QUANTIZED_LAYERS, FoldedBatchNorm2d, QuantConv2d, QuantConvBn2d
from lightning_qat.quant import FakeQuantize, compute_qparams

PASS_THROUGH = (nn.Flatten, nn.Identity, nn.Dropout, FoldedBatchNorm2d)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class QuantGrid:
    """A per-tensor activation grid: ``x_hat = scale · (q - zero_point)``, ``q`` in
    ``[qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclass
class QuantizeInput:
    """``q = clamp(round(x / s) + z, qmin, qmax)`` of the float input."""

    grid: QuantGrid
    #: the input was left float in training (``quantize_first_input=False``)
    float_in_training: bool


@dataclass
class QuantizedLayer:
    """One quantized Conv2d or Linear with every number on its integer grid.

    ``acc = Σ (q_x - z_x)(q_w - z_w) + bias`` (int32 arithmetic; ``bias`` of scale
    ``s_x s_w``, zero point 0, Jacob et al. section 2.4), then requantized to ``output``
    with ``M = s_x s_w / s_out`` or, where ``output`` is None, dequantized as
    ``acc · s_x s_w``.
    """

    name: str
    kind: str  # "conv" or "linear"
    weight_codes: torch.Tensor  # int64 codes q_w, (out, in[, kh, kw])
    weight_scale: torch.Tensor  # float64, one per output channel (or 0-d)
    weight_zero_point: torch.Tensor  # int64, as weight_scale
    weight_qmin: int
    weight_qmax: int
    bias: torch.Tensor  # int64 values of int32 range, (out,)
    input: QuantGrid
    output: QuantGrid | None
    conv_args: dict = field(default_factory=dict)

    @property
    def accumulator_scale(self) -> torch.Tensor:
        """``s_x s_w`` per output channel (float64)."""
        return (self.input.scale * self.weight_scale.double()).expand(self.weight_codes.shape[0])


@dataclass
class ReLU:
    """ReLU: on codes a clamp at the zero point (``zero_point``); on float (after the last
    layer's dequantization) ``zero_point`` is None."""

    zero_point: int | None


@dataclass
class Pool:
    """A pooling module, applied on codes (``on_codes``) or on float."""

    module: nn.Module
    on_codes: bool


@dataclass
class Flatten:
    start_dim: int
    end_dim: int


Step = QuantizeInput | QuantizedLayer | ReLU | Pool | Flatten


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The (name, module) of a (nested) Sequential in call order."""
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in module.named_children()]
            stack.extend(reversed(children))
        else:
            yield prefix, module


def quantize_codes(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / s) + z, qmin, qmax)`` as int64 (round half to even, as torch)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int64)


def _input_grid(quantizer: FakeQuantize, name: str) -> QuantGrid:
    if not torch.isfinite(quantizer.observer.min_val).all():
        raise ValueError(
            f"{name or 'a layer'} never observed its input: train or calibrate the model "
            "before exporting"
        )
    return QuantGrid(
        float(quantizer.scale), int(quantizer.zero_point), quantizer.quant_min, quantizer.quant_max
    )


def _float_weight_and_bias(
    layer: nn.Module, following_bn: nn.BatchNorm2d | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float weight and bias as the deployed layer computes them, and the weight's scale
    and zero point. An unfolded BatchNorm after the layer is folded in here and the folded
    weight re-quantized with ranges from its own values (the cost of not folding in
    training)."""
    quantizer = layer.weight_quantizer
    if isinstance(layer, QuantConvBn2d):
        factor = layer.fold_factor()
        weight, bias = layer.weight_to_quantize(), layer.folded_bias(factor)
    else:
        weight = layer.weight
        bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
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
    return weight.detach(), bias.detach(), scale.double(), zero_point.long()


def _fit_bias_in_int32(
    bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor
) -> torch.Tensor:
    """The weight scale, raised where the bias would not fit in int32 at scale ``s_x s_w``.

    That happens only for a channel whose weights are (almost) all zero, e.g. a pruned
    channel whose folded BN still adds a bias: its weight scale is the minimum one and
    ``b / (s_x s_w)`` overflows. A coarser scale there costs nothing (its weight codes
    stay 0) and keeps the bias exact to within one step of ``s_x s_w``.
    """
    per_channel = weight_scale.dim() == 1
    needed = bias.double().abs() / (input_scale * (INT32_MAX - 1))
    if not per_channel:
        needed = needed.max()
    return torch.maximum(weight_scale, needed)


def _layer(
    name: str, module: nn.Module, bn: nn.BatchNorm2d | None, grid: QuantGrid, output
) -> QuantizedLayer:
    weight, bias, s_w, z_w = _float_weight_and_bias(module, bn)
    quantizer = module.weight_quantizer
    s_w = _fit_bias_in_int32(bias, grid.scale, s_w)
    shape = (-1, *[1] * (weight.dim() - 1))
    codes = quantize_codes(
        weight.double(),
        s_w.reshape(shape),
        z_w.reshape(shape),
        quantizer.quant_min,
        quantizer.quant_max,
    )
    conv_args = {}
    if weight.dim() == 4:
        if module.padding_mode != "zeros":
            raise ValueError(f"export: {name} pads with {module.padding_mode!r}; zeros only")
        conv_args = dict(
            stride=tuple(module.stride),
            padding=tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
        )
    accumulator_scale = (grid.scale * s_w).expand(weight.shape[0])
    return QuantizedLayer(
        name=name,
        kind="conv" if weight.dim() == 4 else "linear",
        weight_codes=codes,
        weight_scale=s_w,
        weight_zero_point=z_w,
        weight_qmin=quantizer.quant_min,
        weight_qmax=quantizer.quant_max,
        bias=torch.round(bias.double() / accumulator_scale).to(torch.int64),
        input=grid,
        output=output,
        conv_args=conv_args,
    )


@torch.no_grad()
def plan_deployment(model: nn.Module) -> list[Step]:
    """The integer steps of a trained QAT ``model`` (see the module docstring).

    Raises:
        ValueError: a module that cannot run on integers (a float layer between quantized
            ones, an unfolded BatchNorm not right after a quantized conv, non-zero
            padding), a layer that never observed its input, or no quantized layer.
    """
    leaves = list(_leaves(model))
    steps: list[Step] = []
    grid: QuantGrid | None = None  # the grid of the current codes; None once float
    started = False
    skip = set()
    for index, (name, module) in enumerate(leaves):
        if index in skip or isinstance(module, PASS_THROUGH):
            if isinstance(module, nn.Flatten):
                steps.append(Flatten(module.start_dim, module.end_dim))
            continue
        if isinstance(module, QUANTIZED_LAYERS):
            quantizer = module.activation_quantizer
            layer_input = _input_grid(quantizer, name)
            if not started:
                if any(not isinstance(step, Flatten) for step in steps):
                    raise ValueError(
                        f"export: {type(leaves[index - 1][1]).__name__} runs in float before "
                        "the first quantized layer; only the input may be float"
                    )
                steps.append(QuantizeInput(layer_input, not quantizer.fake_quant_enabled))
                started = True
            elif grid is None:
                raise ValueError(f"export: {name} follows a float layer output")
            following = leaves[index + 1][1] if index + 1 < len(leaves) else None
            bn = following if type(following) is nn.BatchNorm2d else None
            if bn is not None:
                if not isinstance(module, QuantConv2d) or isinstance(module, QuantConvBn2d):
                    raise ValueError("export: an unfolded BatchNorm must follow a QuantConv2d")
                skip.add(index + 1)
            next_layer = next(
                ((n, m) for n, m in leaves[index + 1 :] if isinstance(m, QUANTIZED_LAYERS)),
                None,
            )
            grid = None
            if next_layer is not None:
                grid = _input_grid(next_layer[1].activation_quantizer, next_layer[0])
            steps.append(_layer(name, module, bn, layer_input, grid))
        elif isinstance(module, nn.ReLU):
            steps.append(ReLU(grid.zero_point if grid is not None else None))
        elif isinstance(module, POOLS):
            steps.append(Pool(module, on_codes=grid is not None))
        else:
            raise ValueError(
                f"export: cannot run {name} ({type(module).__name__}) on integers "
                "(supported: quantized Conv2d/Linear, ReLU, max/average pooling, Flatten; "
                "an unfolded BatchNorm right after a quantized conv)"
            )
    if not started:
        raise ValueError("export found no quantized layer: convert with prepare_qat first")
    return steps
