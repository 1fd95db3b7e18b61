"""What a trained QAT model deploys as: integer steps on named values, shared by every
exporter.

`plan_deployment` traces a prepared model with torch.fx (`lightning_qat.graph`) and
lowers it to the steps of Jacob et al. 2018's integer-only model (section 2.2), with
every number already on its integer grid. Each step reads named values and writes one;
a value is either float or integer codes on a `QuantGrid`:

- `QuantizeInput`: float to codes (the model input, or the output of a float op that an
  integer op reads);
- `QuantizedLayer`: a Conv2d (grouped and depthwise too) or Linear with weight codes (BN
  folded in), an int32 bias of scale ``s_x s_w``, its input grid, and the grid its
  accumulator is requantized to (that of the tensor's next integer consumer) or ``None``
  (dequantized to float);
- `Add`, `Concat`: each input on its own grid, requantized to the output grid (TFLite's
  add, onnxruntime's QLinearAdd and QLinearConcat), or in float where an input or the
  output is not quantized;
- `Pool`: max pooling on codes (it commutes with quantization), average pooling with the
  mean rounded on codes and requantized, or either in float;
- `ReLU` (a clamp at the zero point on codes; ReLU6 also at the code of 6.0) and
  `Flatten`;
- `InsertZeros`: a transposed convolution's input spread out with zeros (codes: the zero
  point) between neighbouring positions, so that the transposed convolution runs as an
  ordinary `QuantizedLayer` convolution (flipped weights, stride 1) on integer kernels.

Dropout, identity, folded BatchNorms and activation quantizers whose input is already on
their grid write no step: their output is their input's value. `to_integer` (the exact
reference) and `to_onnx` (onnxruntime's int8 kernels) both read this plan, so they
deploy the same numbers.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_qat.graph import Kind, Op, PoolSpec, classify, trace
from lightning_qat.graph.ops import SAME_GRID
from lightning_qat.graph.placement import data_users
from lightning_qat.nn import (
    QUANTIZED_LAYERS,
    QuantConvBnMixin,
    QuantConvTranspose2d,
    QuantMultiheadAttention,
)
from lightning_qat.nn.pruning import apply_pruning
from lightning_qat.quant import FakeQuantize, bias_codes

#: The quantized layers the deployment plan writes as one `QuantizedLayer` (an attention
#: has a step of its own).
EXPORTED_LAYERS = tuple(layer for layer in QUANTIZED_LAYERS if layer is not QuantMultiheadAttention)
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class QuantGrid:
    """A per-tensor activation grid: ``x_hat = scale · (q - zero_point)``, ``q`` in
    ``[qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def code_of(self, value: float) -> int:
        """The code of a real value, clamped to the grid (e.g. ReLU6's 6.0)."""
        return int(min(max(round(value / self.scale) + self.zero_point, self.qmin), self.qmax))


@dataclass
class Step:
    """One deployed op: reads the values named ``inputs``, writes the value ``value``."""

    inputs: tuple[str, ...]
    value: str


@dataclass
class QuantizeInput(Step):
    """``q = clamp(round(x / s) + z, qmin, qmax)`` of a float value."""

    grid: QuantGrid
    #: the value was left float in training (``quantize_first_input=False``)
    float_in_training: bool = False


@dataclass
class Requantize(Step):
    """Codes moved from ``input_grid`` to ``output_grid``: ``clamp(round(s_in / s_out ·
    (q - z_in)) + z_out, qmin, qmax)`` (a layer reading a value of the residual path at
    its own width, `QuantConfig.residual_bits`)."""

    input_grid: QuantGrid = None
    output_grid: QuantGrid = None


@dataclass
class QuantizedLayer(Step):
    """One quantized Conv2d or Linear with every number on its integer grid.

    ``acc = Σ (q_x - z_x)(q_w - z_w) + bias`` (int32 arithmetic; ``bias`` of scale
    ``s_x s_w``, zero point 0, Jacob et al. section 2.4), then requantized to
    ``output_grid`` with ``M = s_x s_w / s_out`` or, where it is None, dequantized as
    ``acc · s_x s_w``.
    """

    name: str = ""
    kind: str = "conv"  # "conv" or "linear"
    weight_codes: torch.Tensor = None  # int64 codes q_w, (out, in[, kh, kw])
    weight_scale: torch.Tensor = None  # float64, one per output channel (or 0-d)
    weight_zero_point: torch.Tensor = None  # int64, as weight_scale
    weight_qmin: int = -127
    weight_qmax: int = 127
    bias: torch.Tensor = None  # int64 values of int32 range, (out,)
    input_grid: QuantGrid = None
    output_grid: QuantGrid | None = None
    conv_args: dict = field(default_factory=dict)

    @property
    def accumulator_scale(self) -> torch.Tensor:
        """``s_x s_w`` per output channel, the float32 product as float64."""
        scale = torch.tensor(self.input_grid.scale, dtype=torch.float32) * self.weight_scale.float()
        return scale.double().expand(self.weight_codes.shape[0])


@dataclass
class Add(Step):
    """``y = a + b``: on codes, each input requantized to ``output_grid`` and added
    (TFLite's integer add); in float where an input grid or the output grid is None."""

    input_grids: tuple[QuantGrid | None, ...] = ()
    output_grid: QuantGrid | None = None


@dataclass
class Concat(Step):
    """Concatenation along ``dim``: on codes, each input requantized to ``output_grid``
    (onnxruntime's QLinearConcat); in float where a grid is None."""

    dim: int = 1
    input_grids: tuple[QuantGrid | None, ...] = ()
    output_grid: QuantGrid | None = None


@dataclass
class Pool(Step):
    """Pooling. Max pooling on codes keeps the grid (``output_grid == input_grid``);
    average pooling on codes with an ``output_grid`` sums ``q - z_in`` over the window and
    requantizes with ``M = s_in / (N s_out)``; with ``output_grid`` None it pools in float
    (dequantizing codes first)."""

    pool: PoolSpec = None
    input_grid: QuantGrid | None = None
    output_grid: QuantGrid | None = None


@dataclass
class ReLU(Step):
    """ReLU (or ReLU6): on codes a clamp to ``[zero_point, high]`` (``high`` the code of
    6.0 for ReLU6, else None); on float (``zero_point`` None) ``clamp(x, 0, high)``."""

    zero_point: int | None = None
    high: float | int | None = None


@dataclass
class Flatten(Step):
    start_dim: int = 1
    end_dim: int = -1


@dataclass
class InsertZeros(Step):
    """``stride - 1`` zeros between neighbouring input positions of each spatial
    dimension and ``end`` more after the last one: ``[H, W]`` becomes ``[(H - 1) s_h + 1 +
    end_h, (W - 1) s_w + 1 + end_w]``, the input at ``[i s_h, j s_w]``. On codes a zero is
    the zero point ``fill`` (the grid is kept).

    A transposed convolution with stride ``s``, padding ``p``, dilation ``d``, kernel
    ``k`` and output padding ``o`` is this, then an ordinary convolution with stride 1,
    padding ``d (k - 1) - p``, the same dilation and groups, and the kernel flipped in
    both spatial dimensions (Dumoulin and Visin 2016, "A guide to convolution arithmetic
    for deep learning", section 4.6); ``end = o``."""

    stride: tuple[int, int] = (1, 1)
    end: tuple[int, int] = (0, 0)
    fill: int = 0


@dataclass
class Transpose(Step):
    """Two dimensions swapped, on codes (the grid is kept) or on float."""

    dims: tuple[int, int] = (1, 2)


@dataclass
class Constant(Step):
    """A Parameter or buffer the model's forward reads (a learned position embedding),
    as the float tensor a float op takes."""

    tensor: torch.Tensor = None


@dataclass
class FloatOp(Step):
    """A float island: an op no integer runtime runs on codes (DESIGN.md section 6),
    computed in float on its dequantized input (``input_grid``, None for a float input).
    ``op``: ``layer_norm`` over the last dimension (``weight``, ``bias``, ``eps``),
    ``gelu`` (``approximate``), ``mean`` (``dims``, ``keepdim``)."""

    op: str = ""
    input_grid: QuantGrid | None = None
    attributes: dict = field(default_factory=dict)


@dataclass
class Attention(Step):
    """Multi-head self-attention (`lightning_qat.nn.QuantMultiheadAttention`) on
    integers, for an input ``[N, T, E]`` of codes:

    - ``projections``: Q, K, V as three linear layers on the input codes, each
      requantized to its operand grid (``1/sqrt(d)`` folded into Q's multiplier: its
      output grid is ``operand_grids[0]`` with the scale times ``sqrt(d)``);
    - per head, ``scores = s_q s_k Σ (q - z_q)(k - z_k)``: an int32 product dequantized
      for the softmax, which runs in float and is quantized to ``attention_grid``;
    - ``Σ (p - z_p)(v - z_v)`` requantized with ``M = s_p s_v / s_c`` to
      ``context_grid``, the output projection's input grid, heads merged;
    - ``out_proj``, a linear layer (output requantized or float as any layer's).
    """

    heads: int = 1
    projections: tuple[QuantizedLayer, ...] = ()
    operand_grids: tuple[QuantGrid, ...] = ()
    attention_grid: QuantGrid = None
    context_grid: QuantGrid = None
    out_proj: QuantizedLayer = None


@dataclass
class DeploymentPlan:
    """The steps, in an order that computes every input before it is read.

    Attributes:
        steps: the steps.
        input: the name of the float model input.
        output: the name of the model output (float, or codes on ``grids[output]``).
        grids: the grid of every value held as codes.
    """

    steps: list[Step]
    input: str
    output: str
    grids: dict[str, QuantGrid]

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def consumers(self, value: str) -> list[Step]:
        """The steps reading ``value``."""
        return [step for step in self.steps if value in step.inputs]


def quantize_codes(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x · (1/s)) + z, qmin, qmax)`` as int64, computed in float32 exactly as
    torch's fake-quant kernels compute it (``nearbyint(x * inv_scale)``, half to even)."""
    inverse = torch.reciprocal(torch.as_tensor(scale, dtype=torch.float32))
    codes = torch.round(x.float() * inverse) + torch.as_tensor(zero_point)
    return torch.clamp(codes, qmin, qmax).to(torch.int64)


def grid_of(quantizer: FakeQuantize, name: str) -> QuantGrid:
    """The per-tensor grid of an activation quantizer that has observed data."""
    if not torch.isfinite(quantizer.observer.min_val).all():
        raise ValueError(
            f"{name or 'a layer'} never observed its input: train or calibrate the model "
            "before exporting"
        )
    if quantizer.per_channel:
        raise ValueError(f"export: {name} quantizes its input per channel; per tensor only")
    return QuantGrid(
        float(quantizer.scale.detach()),
        int(quantizer.zero_point),
        quantizer.quant_min,
        quantizer.quant_max,
    )


def _weight_codes(
    layer: nn.Module, following_bn: nn.BatchNorm2d | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point, float weight, float bias)`` as the deployed layer
    computes them.

    The codes are read back from the weight quantizer's own output, so they are those the
    fake-quant model multiplies with, bit for bit. An unfolded BatchNorm after the layer
    (`_fold_into_scales`) is folded into the weight scales and the bias, the codes kept."""
    quantizer = layer.weight_quantizer
    # output channels first (a transposed convolution stores its weight input first)
    weight = layer.weight_to_quantize()
    if isinstance(layer, QuantConvBnMixin) and not layer.step_in_weight_units:
        bias = layer.folded_bias(layer.fold_factor())
    else:
        bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
    if isinstance(layer, QuantConvBnMixin) and layer.step_in_weight_units:
        # codes of w on its learned step, then its own BatchNorm folded into the scales
        # (the layer's grid, `QuantConvBn2d`), as for an unfolded BatchNorm (the planner
        # refuses a BatchNorm after a folded layer)
        following_bn = layer.bn
    shape = (-1, *[1] * (weight.dim() - 1))
    # an eval forward computes the scales of the current weights where observing
    fake = quantizer(weight).double()
    scale, zero_point = quantizer.scale.detach().double(), quantizer.zero_point.long()
    view = scale.reshape(shape) if quantizer.per_channel else scale
    z = zero_point.reshape(shape) if quantizer.per_channel else zero_point
    codes = torch.round(fake / view).long() + z
    weights = codes, scale, zero_point, weight.detach(), bias.detach()
    if following_bn is None:
        return weights
    return _fold_into_scales(weights, following_bn, quantizer)


def _fold_into_scales(
    weights: tuple[torch.Tensor, ...], bn: nn.modules.batchnorm._BatchNorm, quantizer: FakeQuantize
) -> tuple[torch.Tensor, ...]:
    """A layer's weights (as `_weight_codes` gives them) with the eval BatchNorm after it
    folded in, exactly: the trained codes are kept.

    The BatchNorm scales output channel ``c`` by ``f_c = gamma_c / sqrt(var_c + eps)``
    and shifts it by ``beta_c - f_c mu_c``. On the accumulator ``s_x s_w (acc + b_q)`` that
    is a per-channel scale, so the folded layer has weight scale ``s_w |f_c|`` and the
    shift in its bias: what the fake-quant model computes, up to the rounding of the
    shift to the int32 bias grid. Where ``f_c < 0`` the channel's codes are mirrored on
    the grid, ``q' = qmin + qmax - q`` and ``z' = qmin + qmax - z`` (so ``q' - z' = -(q -
    z)``), which stays on the grid for any ``q`` (a plain negation would not: ``-qmin``).
    Folding the float weight and quantizing it again would cost what training never saw.
    """
    codes, scale, zero_point, weight, bias = weights
    channels = codes.shape[0]
    shape = (-1, *[1] * (codes.dim() - 1))
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    factor = (gamma * torch.rsqrt(bn.running_var + bn.eps)).detach()
    mirror = quantizer.quant_min + quantizer.quant_max
    negative = factor < 0
    zero_point = zero_point.expand(channels)
    codes = torch.where(negative.reshape(shape), mirror - codes, codes)
    zero_point = torch.where(negative, mirror - zero_point, zero_point)
    # gamma = 0 (a pruned BN channel) outputs its shift alone: zero weights, scale kept
    dead = factor == 0
    codes = torch.where(dead.reshape(shape), zero_point.reshape(shape), codes)
    folded_scale = scale.expand(channels) * torch.where(dead, 1.0, factor.abs()).double()
    return (
        codes,
        folded_scale,
        zero_point,
        weight * factor.reshape(shape),
        (beta + (bias - bn.running_mean) * factor).detach(),
    )


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
    # codes up to 2^30: half the int32 range, a margin for the float32 scale product
    needed = bias.double().abs() / (input_scale * 2**30)
    if not per_channel:
        needed = needed.max()
    return torch.maximum(weight_scale, needed)


def _layer(
    name: str,
    module: nn.Module,
    bn: nn.BatchNorm2d | None,
    grid: QuantGrid,
    output_grid: QuantGrid | None,
    inputs: tuple[str, ...],
    value: str,
) -> QuantizedLayer:
    weights = _weight_codes(module, bn)
    conv_args = {}
    if weights[0].dim() > 2:
        if module.padding_mode != "zeros":
            raise ValueError(f"export: {name} pads with {module.padding_mode!r}; zeros only")
        conv_args = dict(
            stride=tuple(module.stride),
            padding=tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
        )
    if isinstance(module, QuantConvTranspose2d):  # after `InsertZeros`: see its docstring
        codes, scale, zero_point, weight, bias = weights
        weights = (codes.flip(2, 3), scale, zero_point, weight.flip(2, 3), bias)
        conv_args.update(stride=(1, 1), padding=_transposed_padding(module))
    return _layer_step(
        name,
        module.weight_quantizer,
        weights,
        grid,
        output_grid,
        inputs,
        value,
        conv_args,
        getattr(module, "bias_grid_refinement", 1),
    )


def _transposed_padding(module: nn.ConvTranspose2d) -> tuple[int, ...]:
    """``d (k - 1) - p`` per spatial dimension: the padding of the convolution that a
    transposed convolution is on its zero-spread input (negative: not expressible)."""
    return tuple(
        d * (k - 1) - p
        for d, k, p in zip(module.dilation, module.kernel_size, module.padding, strict=True)
    )


def _layer_step(
    name: str,
    quantizer: FakeQuantize,
    weights: tuple[torch.Tensor, ...],
    grid: QuantGrid,
    output_grid: QuantGrid | None,
    inputs: tuple[str, ...],
    value: str,
    conv_args: dict | None = None,
    refinement: int = 1,
) -> QuantizedLayer:
    """The step of a layer whose weights (``(codes, scale, zero_point, float weight,
    float bias)``, as `_weight_codes` gives them) ``quantizer`` quantized.

    ``refinement`` (`QuantConfig.fine_bias_grid`, symmetric weights): the codes are
    stored times ``r`` and the scale divided by it, ``(r q) (s_w / r)``, the same
    weights on int8 codes (still ``2^b`` levels), so that the accumulator's grid, and
    the bias on it, are ``r`` times finer."""
    codes, s_w, z_w, weight, bias = weights
    qmin, qmax = quantizer.quant_min, quantizer.quant_max
    if refinement > 1:
        codes, s_w = codes * refinement, s_w / refinement
        qmin, qmax = -128, 127
    fitted = _fit_bias_in_int32(bias, grid.scale, s_w)
    if not torch.equal(fitted, s_w):  # a dead channel: its codes on the coarser scale
        shape = (-1, *[1] * (weight.dim() - 1))
        changed = (fitted != s_w).reshape(shape) if fitted.dim() else fitted != s_w
        recoded = quantize_codes(
            weight,
            fitted.reshape(shape) if fitted.dim() else fitted,
            z_w.reshape(shape) if z_w.dim() else z_w,
            qmin,
            qmax,
        )
        codes = torch.where(changed, recoded, codes)
        s_w = fitted
    # s_b = s_x s_w in float32, the product the fake-quant layer rounds its bias with
    bias_scale = (torch.tensor(grid.scale, dtype=torch.float32) * s_w.float()).double()
    accumulator_scale = bias_scale.expand(weight.shape[0])
    return QuantizedLayer(
        inputs=inputs,
        value=value,
        name=name,
        kind="conv" if weight.dim() > 2 else "linear",
        weight_codes=codes,
        weight_scale=s_w,
        weight_zero_point=z_w,
        weight_qmin=qmin,
        weight_qmax=qmax,
        bias=bias_codes(bias.float(), accumulator_scale).to(torch.int64),
        input_grid=grid,
        output_grid=output_grid,
        conv_args=conv_args or {},
    )


def _blocks(weights: tuple[torch.Tensor, ...], count: int) -> list[tuple[torch.Tensor, ...]]:
    """``(codes, scale, zero_point, weight, bias)`` of a layer split into ``count`` layers
    along the output channels (an attention's packed Q/K/V projection)."""

    def split(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return t.chunk(count) if t.dim() else (t,) * count

    return list(zip(*(split(t) for t in weights), strict=True))


class _Planner:
    """Walks the classified graph of a prepared model in order and writes the steps."""

    def __init__(self, model: nn.Module):
        recurrent = [
            f"{n} ({type(m).__name__})"
            for n, m in model.named_modules()
            if isinstance(m, nn.RNNBase)
        ]
        if recurrent:
            raise ValueError(
                f"export: {', '.join(recurrent)}: recurrent layers are not exported (QAT "
                "leaves them float; onnxruntime's dynamic quantization, DynamicQuantizeLSTM, "
                "runs them with int8 weights on a float export)"
            )
        try:
            traced = trace(model)
        except Exception as err:  # torch.fx raises many kinds of errors on untraceable code
            raise ValueError(
                f"export: torch.fx could not trace {type(model).__name__} "
                f"({type(err).__name__}: {err}); the export needs a traceable model"
            ) from err
        self.model = model
        self.ops = classify(traced.graph, traced.modules)
        self.users = data_users(self.ops)
        self.steps: list[Step] = []
        self.names: dict[fx.Node, str] = {}  # node -> the value it holds
        self.grids: dict[str, QuantGrid] = {}  # value -> its grid, for codes
        self.merged: set[fx.Node] = set()  # BatchNorms folded into the layer before them
        self.input: str | None = None
        self.output: str | None = None

    # ------------------------------------------------------------------ helpers
    def grid(self, node: fx.Node) -> QuantGrid | None:
        return self.grids.get(self.names[node])

    def target_grid(self, node: fx.Node) -> QuantGrid | None:
        """The grid the value of ``node`` is quantized to by what reads it (through
        grid-keeping ops): an activation quantizer, or a layer's own input quantizer;
        None where nothing quantizes it."""
        grids, stack = set(), list(self.users[node])
        while stack:
            op = self.ops[stack.pop()]
            module = op.params.get("module")
            if op.kind is Kind.QUANTIZER:
                grids.add(grid_of(module, op.where))
            elif op.kind is Kind.LAYER and not module.input_quantized_upstream:
                grids.add(grid_of(module.activation_quantizer, op.where))
            elif op.kind in SAME_GRID:
                stack.extend(self.users[op.node])
        if len(grids) > 1:
            raise ValueError(
                f"export: the output of {self.ops[node].label} is read on {len(grids)} "
                "different grids; prepare the model with this version of prepare_qat"
            )
        return grids.pop() if grids else None

    def emit(self, step: Step, node: fx.Node, grid: QuantGrid | None) -> None:
        self.steps.append(step)
        self.names[node] = step.value
        if grid is not None:
            self.grids[step.value] = grid

    def quantized(self, node: fx.Node, grid: QuantGrid, float_in_training: bool) -> str:
        """The value of ``node`` as codes on ``grid`` (quantizing it if it is float)."""
        name = self.names[node]
        have = self.grids.get(name)
        if have is None:
            value = f"{name}_q"
            self.steps.append(QuantizeInput((name,), value, grid, float_in_training))
            self.grids[value] = grid
            return value
        if have != grid:  # a layer putting a value of the residual path on its own grid
            value = f"{name}_requantized{len(self.steps)}"
            self.steps.append(Requantize((name,), value, have, grid))
            self.grids[value] = grid
            return value
        return name

    def refuse(self, op: Op | list[Op], why: str = "") -> None:
        ops = op if isinstance(op, list) else [op]
        raise ValueError(
            f"export: cannot run {'; '.join(o.label for o in ops)} on integers{why} "
            "(supported: quantized Conv2d/Conv1d/ConvTranspose2d/Linear with folded or "
            "float BatchNorm, self-attention, ReLU/ReLU6, residual add, concatenation, "
            "max/average/adaptive-average pooling, flatten, transpose, dropout, identity; "
            "in float: LayerNorm, GELU, mean, adding a Parameter)"
        )

    # ------------------------------------------------------------------ the walk
    def run(self) -> DeploymentPlan:
        unsupported = [
            op for op in self.ops.values() if op.kind is Kind.FLOAT and _float_op(op) is None
        ]
        if unsupported:  # all of them at once
            self.refuse(unsupported)
        for node, op in self.ops.items():
            if node in self.merged or op.kind in (Kind.META,):
                continue
            handler = getattr(self, f"_{op.kind.value}", None)
            if handler is None:
                self.refuse(op)
            handler(node, op)
        if not any(isinstance(s, QuantizedLayer) for s in self.steps):
            raise ValueError("export found no quantized layer: convert with prepare_qat first")
        return DeploymentPlan(self.steps, self.input, self.output, self.grids)

    def _input(self, node: fx.Node, op: Op) -> None:
        if self.input is not None:
            if self.users[node]:
                self.refuse(op, " (a second model input)")
            return
        self.input = self.names[node] = node.name

    def _output(self, node: fx.Node, op: Op) -> None:
        if len(op.inputs) != 1 or not isinstance(node.args[0], fx.Node):
            self.refuse(op, " (the export writes models with one output tensor)")
        self.output = self.names[op.inputs[0]]

    def _const(self, node: fx.Node, op: Op) -> None:
        if self.users[node]:  # read as a float tensor (no grid): ops on it run in float
            tensor = functools.reduce(getattr, str(node.target).split("."), self.model)
            self.emit(Constant((), node.name, tensor.detach().float()), node, None)

    def _float(self, node: fx.Node, op: Op) -> None:
        name, attributes = _float_op(op)
        source = op.inputs[0]
        step = FloatOp((self.names[source],), node.name, name, self.grid(source), attributes)
        self.emit(step, node, None)

    def _permute(self, node: fx.Node, op: Op) -> None:
        source = op.inputs[0]
        step = Transpose((self.names[source],), node.name, tuple(op.params["dims"]))
        self.emit(step, node, self.grid(source))

    def _identity(self, node: fx.Node, op: Op) -> None:
        self.names[node] = self.names[op.inputs[0]]

    def _quantizer(self, node: fx.Node, op: Op) -> None:
        module = op.params["module"]
        source = op.inputs[0]
        grid = grid_of(module, op.where)
        self.names[node] = self.quantized(source, grid, not module.fake_quant_enabled)

    def _layer(self, node: fx.Node, op: Op) -> None:
        module = op.params["module"]
        if not hasattr(module, "weight_quantizer"):
            self.refuse(op, " (a float layer: excluded from quantization)")
        if isinstance(module, QuantMultiheadAttention):
            self._attention(node, op, module)
            return
        if not isinstance(module, EXPORTED_LAYERS):
            self.refuse(op, f" ({type(module).__name__} trains quantized but is not exported yet)")
        quantizer = module.activation_quantizer
        grid = grid_of(quantizer, op.where)
        source = self.quantized(op.inputs[0], grid, not quantizer.fake_quant_enabled)
        if isinstance(module, QuantConvTranspose2d):
            source = self._insert_zeros(node, op, module, source, grid)
        users = self.users[node]
        bn, value_node = None, node
        if len(users) == 1 and self.ops[users[0]].kind is Kind.LAYER_BN:
            if isinstance(module, QuantConvBnMixin):
                self.refuse(self.ops[users[0]], " (a float BatchNorm after a folded layer)")
            bn, value_node = self.ops[users[0]].params["module"], users[0]
            self.merged.add(value_node)
            self.names[node] = f"{node.name}_conv"  # never read: the BN's value replaces it
        output_grid = self.target_grid(value_node)
        step = _layer(op.where, module, bn, grid, output_grid, (source,), value_node.name)
        self.emit(step, value_node, output_grid)

    def _insert_zeros(
        self, node: fx.Node, op: Op, module: QuantConvTranspose2d, source: str, grid: QuantGrid
    ) -> str:
        """The codes ``source`` spread out for the convolution a transposed convolution
        runs as (`InsertZeros`); ``source`` itself where there is nothing to spread."""
        if len(node.args) > 1 or node.kwargs:
            self.refuse(op, " (an output_size passed in forward)")
        if any(p < 0 for p in _transposed_padding(module)):
            self.refuse(op, " (padding larger than dilation x (kernel - 1))")
        stride, end = tuple(module.stride), tuple(module.output_padding)
        if stride == (1, 1) and end == (0, 0):
            return source
        value = f"{node.name}_spread"
        self.steps.append(InsertZeros((source,), value, stride, end, grid.zero_point))
        self.grids[value] = grid
        return value

    def _attention(self, node: fx.Node, op: Op, module: QuantMultiheadAttention) -> None:
        if not module.self_attention:
            self.refuse(op, " (cross-attention is not exported yet)")
        masks = [k for k in ("attn_mask", "key_padding_mask") if node.kwargs.get(k) is not None]
        if masks or len(node.args) > 3:
            self.refuse(op, f" (an attention mask: {', '.join(masks) or 'positional'})")
        if any(not (u.target is operator.getitem and u.args[1] == 0) for u in node.users):
            self.refuse(op, " (its attention weights are read)")
        quantizer = module.activation_quantizer
        grid = grid_of(quantizer, op.where)
        source = self.quantized(op.inputs[0], grid, not quantizer.fake_quant_enabled)
        operands = [
            grid_of(getattr(module, f"{part}_quantizer"), op.where)
            for part in ("query", "key", "value")
        ]
        # Q's codes hold Q / sqrt(d): the 1/sqrt(d) folds into its requantization
        scaled_query = replace(operands[0], scale=operands[0].scale * math.sqrt(module.head_dim))
        projections = tuple(
            _layer_step(
                f"{op.where}.{part}_projection",
                module.weight_quantizer,
                weights,
                grid,
                output_grid,
                (source,),
                f"{node.name}_{part}",
            )
            for part, weights, output_grid in zip(
                ("query", "key", "value"),
                _blocks(_weight_codes(module, None), 3),
                (scaled_query, operands[1], operands[2]),
                strict=True,
            )
        )
        context_grid = grid_of(module.out_proj.activation_quantizer, f"{op.where}.out_proj")
        output_grid = self.target_grid(node)
        out_proj = _layer(
            f"{op.where}.out_proj",
            module.out_proj,
            None,
            context_grid,
            output_grid,
            (f"{node.name}_context",),
            node.name,
        )
        step = Attention(
            (source,),
            node.name,
            heads=module.num_heads,
            projections=projections,
            operand_grids=tuple(operands),
            attention_grid=grid_of(module.attention_quantizer, op.where),
            context_grid=context_grid,
            out_proj=out_proj,
        )
        self.emit(step, node, output_grid)

    def _layer_bn(self, node: fx.Node, op: Op) -> None:
        self.refuse(op, " (a float BatchNorm that no quantized conv folds)")

    def _binary(self, node: fx.Node, op: Op, make) -> None:
        grids = tuple(self.grid(i) for i in op.inputs)
        output_grid = self.target_grid(node) if all(g is not None for g in grids) else None
        inputs = tuple(self.names[i] for i in op.inputs)
        self.emit(make(inputs, node.name, grids, output_grid), node, output_grid)

    def _add(self, node: fx.Node, op: Op) -> None:
        self._binary(node, op, lambda i, v, g, o: Add(i, v, input_grids=g, output_grid=o))

    def _cat(self, node: fx.Node, op: Op) -> None:
        dim = op.params["dim"]
        if not isinstance(dim, int):
            self.refuse(op, " (a concatenation axis computed in forward)")
        self._binary(
            node, op, lambda i, v, g, o: Concat(i, v, dim=dim, input_grids=g, output_grid=o)
        )

    def _avgpool(self, node: fx.Node, op: Op) -> None:
        source = op.inputs[0]
        grid = self.grid(source)
        # in float where nothing integer reads the result (NIN's global pooling at the end)
        output_grid = self.target_grid(node) if grid is not None else None
        step = Pool((self.names[source],), node.name, op.params["pool"], grid, output_grid)
        self.emit(step, node, output_grid)

    def _maxpool(self, node: fx.Node, op: Op) -> None:
        source = op.inputs[0]
        grid = self.grid(source)
        step = Pool((self.names[source],), node.name, op.params["pool"], grid, grid)
        self.emit(step, node, grid)

    def _relu(self, node: fx.Node, op: Op) -> None:
        source = op.inputs[0]
        grid = self.grid(source)
        high = op.params.get("high")
        if grid is None:
            step = ReLU((self.names[source],), node.name, None, high)
        else:
            code_high = grid.code_of(high) if high is not None else None
            step = ReLU((self.names[source],), node.name, grid.zero_point, code_high)
        self.emit(step, node, grid)

    def _flatten(self, node: fx.Node, op: Op) -> None:
        source = op.inputs[0]
        grid = self.grid(source)
        self.emit(Flatten((self.names[source],), node.name, op.params["start_dim"]), node, grid)


def _float_op(op: Op) -> tuple[str, dict] | None:
    """``(name, attributes)`` of a float island the export writes (`FloatOp`), or None."""
    if len(op.inputs) != 1:
        return None
    module = op.params.get("module")
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        weight = None if module.weight is None else module.weight.detach().float()
        bias = None if module.bias is None else module.bias.detach().float()
        return "layer_norm", {"weight": weight, "bias": bias, "eps": module.eps}
    if isinstance(module, nn.GELU):
        return "gelu", {"approximate": module.approximate}
    node = op.node
    if module is None and (node.target is F.gelu or node.target == "gelu"):
        return "gelu", {"approximate": node.kwargs.get("approximate", "none")}
    if module is None and (node.target is torch.mean or node.target == "mean"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = (dims,) if isinstance(dims, int) else dims
        if isinstance(dims, tuple | list) and all(isinstance(d, int) and d != 0 for d in dims):
            return "mean", {"dims": tuple(dims), "keepdim": bool(keepdim)}
    return None


@torch.no_grad()
def plan_deployment(model: nn.Module) -> DeploymentPlan:
    """The integer steps of a trained QAT ``model`` (see the module docstring).

    Raises:
        ValueError: an op the deployment cannot express (named with its module path,
            e.g. ``layer1.0: mul (x * sigmoid(x))``), a model torch.fx cannot trace, a
            layer that never observed its input, or no quantized layer.
    """
    was_training = model.training
    observers = [m.observer for m in model.modules() if isinstance(m, FakeQuantize)]
    synced = [o.sync for o in observers]
    model.eval()
    apply_pruning(model)  # pruned weights as of the last optimizer step, not the last call
    try:
        # deployment runs on one process: no all-reduce of ranges (other ranks may be gone)
        for observer in observers:
            observer.sync = False
        return _Planner(model).run()
    finally:
        model.train(was_training)
        for observer, sync in zip(observers, synced, strict=True):
            observer.sync = sync
