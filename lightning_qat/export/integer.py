"""Integer-only inference reference (Jacob et al. 2018, section 2.2).

`to_integer` turns a trained QAT model into an `IntegerModel` that runs the steps of
`plan_deployment` on integer codes: the input is quantized once; every layer computes
``acc = Σ (q_x - z_x)(q_w - z_w) + b_q`` with int8/uint8 codes and an int32 bias of scale
``s_x s_w``, and requantizes with a Q31 fixed-point multiplier and a rounding shift to
the grid of the tensor's next integer consumer; ReLU is a clamp at the zero point, max
pooling commutes with quantization; a transposed convolution is a convolution on its
input spread out with zero-point codes; a residual add requantizes both inputs to the
output grid with their own multipliers (TFLite's integer add); a concatenation requantizes
each input, as does a layer reading a value at another width than it is held. The last
layer's accumulator is dequantized: the only floating point after the
input quantization (besides float islands, which the plan names).

Exact and fast: PyTorch has no integer convolution on CPU, so the accumulations run as
float32 convolutions on integer values, which are exact when every partial sum stays
below 2^24 in magnitude. For each layer the bound ``A · max_c Σ_k |q_w - z_w|`` (``A`` the
largest ``|q_x - z_x|`` its input grid allows) is checked once; where it is too large the
weights are split into signed base-``2^b`` digits, ``W = Σ_j 2^(b j) D_j``, each digit's
convolution exact, and the digits' int64 results recombined. No rounding ever happens
in the accumulation (tested against float64). That holds on the CPU: cuDNN's convolution
algorithms (Winograd, FFT) and TF32 round, so the model is built and runs there whatever
device the QAT model trained on; inputs move to the CPU and outputs back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qat.export import plan
from lightning_qat.export.fixed_point import quantize_multiplier, requantize
from lightning_qat.export.plan import DeploymentPlan, QuantGrid, plan_deployment

#: float32 holds every integer of magnitude below 2^24 exactly.
EXACT_FLOAT32 = 2**24
#: TFLite's integer add shifts inputs left by 20 bits before rescaling them (8-bit).
ADD_LEFT_SHIFT = 20


def _span(grid: QuantGrid) -> int:
    """The largest ``|q - z|`` on a grid."""
    return max(grid.qmax - grid.zero_point, grid.zero_point - grid.qmin)


def exact_digits(weight: torch.Tensor, input_span: int) -> list[tuple[int, torch.Tensor]]:
    """``[(shift, digit)]`` with ``weight = Σ digit << shift`` such that a float32
    convolution of each digit with inputs of magnitude ``<= input_span`` is exact.

    One digit (the weight itself) where ``input_span · max_c Σ |w_c| < 2^24``; otherwise the
    widest base ``2^b`` whose signed digits (truncated division, so each digit has the
    weight's sign and magnitude below ``2^b``) all pass that bound."""

    def fits(w: torch.Tensor) -> bool:
        return input_span * float(w.abs().flatten(1).sum(1).max()) < EXACT_FLOAT32

    if fits(weight):
        return [(0, weight)]
    magnitude = int(weight.abs().max())
    for bits in range(magnitude.bit_length() - 1, 0, -1):
        digits, rest, shift = [], weight, 0
        while rest.abs().max() > 0:
            low = torch.fmod(rest, 2**bits)  # sign of the dividend, |low| < 2^bits
            digits.append((shift, low))
            rest = torch.div(rest - low, 2**bits, rounding_mode="trunc")
            shift += bits
        if all(fits(d) for _, d in digits):
            return digits
    raise ValueError("no exact split of the weights: input codes too wide")  # not reachable


class _Codes(nn.Module):
    """A step reading codes: its inputs' grids and how to dequantize them."""

    @staticmethod
    def dequantize(q: torch.Tensor, grid: QuantGrid | None) -> torch.Tensor:
        if grid is None:
            return q
        return (q - grid.zero_point).double() * grid.scale

    @staticmethod
    def requantize(acc: torch.Tensor, multiplier: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
        m0, shift = quantize_multiplier(multiplier)
        out = requantize(acc, m0, shift) + grid.zero_point
        return torch.clamp(out, grid.qmin, grid.qmax)

    def to_grid(self, q: torch.Tensor, grid: QuantGrid, out: QuantGrid) -> torch.Tensor:
        """Codes on ``grid`` moved to ``out``: ``round(s / s_out · (q - z)) + z_out``."""
        multiplier = torch.tensor(grid.scale / out.scale, dtype=torch.float64)
        return self.requantize(q - grid.zero_point, multiplier, out)


class IntegerQuantizeInput(_Codes):
    """Float to integer codes: ``clamp(round(x · (1/s)) + z, qmin, qmax)``, rounded as the
    fake-quant kernels round (float32, half to even)."""

    def __init__(self, step: plan.QuantizeInput):
        super().__init__()
        self.grid = step.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        return plan.quantize_codes(x, g.scale, g.zero_point, g.qmin, g.qmax)


class IntegerRequantize(_Codes):
    """Codes moved to another grid with a fixed-point multiplier: ``clamp(round(s_in /
    s_out · (q - z_in)) + z_out, qmin, qmax)``."""

    def __init__(self, step: plan.Requantize):
        super().__init__()
        self.input_grid = step.input_grid
        self.output_grid = step.output_grid

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.to_grid(q, self.input_grid, self.output_grid)


class IntegerLayer(_Codes):
    """One quantized Conv2d or Linear in integer arithmetic.

    Buffers: ``weight`` (``q_w - z_w``), ``bias`` (int32 values, scale ``s_x s_w``) and the
    requantization multipliers ``m0``, ``shift`` to ``output_grid``, or the dequantization
    scale ``s_x s_w`` where the output is float.
    """

    def __init__(self, step: plan.QuantizedLayer):
        super().__init__()
        shape = (-1, *[1] * (step.weight_codes.dim() - 1))
        zero_point = step.weight_zero_point
        weight = step.weight_codes - (zero_point.reshape(shape) if zero_point.dim() else zero_point)
        self.kind = step.kind
        self.name = step.name
        self.conv_args = step.conv_args
        self.input_grid = step.input_grid
        self.output_grid = step.output_grid
        self.register_buffer("weight", weight)
        self.register_buffer("bias", step.bias)
        self.digits = [
            (shift, d.float()) for shift, d in exact_digits(weight, _span(self.input_grid))
        ]
        if self.output_grid is not None:
            m0, shift = quantize_multiplier(step.accumulator_scale / self.output_grid.scale)
            self.register_buffer("m0", m0)
            self.register_buffer("shift", shift)
            self.register_buffer("dequant_scale", None)
        else:
            self.register_buffer("dequant_scale", step.accumulator_scale)

    @property
    def requantizes(self) -> bool:
        return self.output_grid is not None

    def accumulate(self, q: torch.Tensor) -> torch.Tensor:
        """int32 accumulator ``Σ (q_x - z_x)(q_w - z_w) + b_q``, exact (see module doc)."""
        x = (q - self.input_grid.zero_point).float()
        acc = None
        conv = F.conv1d if self.weight.dim() == 3 else F.conv2d
        for shift, digit in self.digits:
            if self.kind == "conv":
                part = conv(x, digit, None, **self.conv_args)
            else:
                part = F.linear(x, digit)
            part = part.to(torch.int64) << shift
            acc = part if acc is None else acc + part
        return acc + self.bias.reshape(self._channel_shape)

    @property
    def _channel_shape(self) -> tuple[int, ...]:
        """A per-output-channel vector's shape against the output."""
        return (1, -1, *[1] * (self.weight.dim() - 2))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        acc = self.accumulate(q)
        shape = self._channel_shape
        if not self.requantizes:
            return acc.double() * self.dequant_scale.reshape(shape)
        out = requantize(acc, self.m0.reshape(shape), self.shift.reshape(shape))
        g = self.output_grid
        return torch.clamp(out + g.zero_point, g.qmin, g.qmax)


class IntegerAdd(_Codes):
    """``y = a + b``. On codes, TFLite's integer add (its reference kernel, 8-bit): both
    inputs shifted left by 20 bits, each rescaled to ``2 max(s_a, s_b)`` by its Q31
    multiplier, summed, and the sum requantized to the output grid. Float otherwise."""

    def __init__(self, step: plan.Add):
        super().__init__()
        self.input_grids = step.input_grids
        self.output_grid = step.output_grid
        if self.output_grid is not None:
            a, b = self.input_grids
            twice_max = 2 * max(a.scale, b.scale)
            self.input_multipliers = [
                torch.tensor(a.scale / twice_max, dtype=torch.float64),
                torch.tensor(b.scale / twice_max, dtype=torch.float64),
            ]
            self.output_multiplier = torch.tensor(
                twice_max / (2**ADD_LEFT_SHIFT * self.output_grid.scale), dtype=torch.float64
            )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.output_grid is None:
            return self.dequantize(a, self.input_grids[0]) + self.dequantize(b, self.input_grids[1])
        total = 0
        for q, grid, multiplier in zip(
            (a, b), self.input_grids, self.input_multipliers, strict=True
        ):
            shifted = (q - grid.zero_point) << ADD_LEFT_SHIFT
            m0, shift = quantize_multiplier(multiplier)
            total = total + requantize(shifted, m0, shift)
        return self.requantize(total, self.output_multiplier, self.output_grid)


class IntegerConcat(_Codes):
    """Concatenation: on codes each input requantized to the output grid,
    ``round(s_i / s_out · (q_i - z_i)) + z_out`` (onnxruntime's QLinearConcat); float
    otherwise."""

    def __init__(self, step: plan.Concat):
        super().__init__()
        self.dim = step.dim
        self.input_grids = step.input_grids
        self.output_grid = step.output_grid

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.output_grid
        if out is None:
            parts = [self.dequantize(q, g) for q, g in zip(inputs, self.input_grids, strict=True)]
            return torch.cat(parts, self.dim)
        parts = []
        for q, grid in zip(inputs, self.input_grids, strict=True):
            parts.append(q if grid == out else self.to_grid(q, grid, out))
        return torch.cat(parts, self.dim)


class IntegerPool(_Codes):
    """Max pooling (on codes, or float) or average pooling: on codes the window sum of
    ``q - z_in``, requantized with ``M = s_in / (N s_out)`` (``N`` the window's count,
    which varies at the borders without ``count_include_pad``); in float otherwise."""

    def __init__(self, step: plan.Pool):
        super().__init__()
        #: a 1-d pool runs as 2-d on a [N, C, 1, L] view
        self.one_d = len(step.pool.kernel) == 1 and not step.pool.global_pool
        self.pool = step.pool.as_2d()
        self.input_grid = step.input_grid
        self.output_grid = step.output_grid

    def _apply(self, x: torch.Tensor, summed: bool = False) -> torch.Tensor:
        p = self.pool
        if p.kind == "max":
            return F.max_pool2d(x, p.kernel, p.stride, p.padding, p.dilation, p.ceil_mode)
        if p.global_pool:
            dims = tuple(range(2, x.dim()))
            pooled = x.sum(dims, keepdim=True) if summed else x.mean(dims, keepdim=True)
            return pooled if p.keepdim else pooled.flatten(1)
        divisor = 1 if summed else None
        return F.avg_pool2d(
            x, p.kernel, p.stride, p.padding, p.ceil_mode, p.count_include_pad, divisor
        )

    def _count(self, x: torch.Tensor) -> torch.Tensor:
        """How many elements each window averages."""
        p = self.pool
        if p.global_pool:
            return torch.full((1,), x.shape[2:].numel(), dtype=torch.float64)
        if p.count_include_pad:  # the padding counts: windows over the padded map
            height, width = x.shape[2] + 2 * p.padding[0], x.shape[3] + 2 * p.padding[1]
            ones = torch.ones(1, 1, height, width, dtype=torch.float64)
            return F.avg_pool2d(ones, p.kernel, p.stride, 0, p.ceil_mode, True, 1)[0, 0]
        ones = torch.ones(1, 1, *x.shape[2:], dtype=torch.float64)
        return F.avg_pool2d(ones, p.kernel, p.stride, p.padding, p.ceil_mode, False, 1)[0, 0]

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.one_d:
            return self._forward(q.unsqueeze(2)).squeeze(2)
        return self._forward(q)

    def _forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.output_grid is None:
            return self._apply(self.dequantize(q, self.input_grid))
        if self.pool.kind == "max":
            return self._apply(q.double()).to(torch.int64)
        grid, out = self.input_grid, self.output_grid
        sums = self._apply((q - grid.zero_point).double(), summed=True).round().to(torch.int64)
        counts = self._count(q)
        multipliers = grid.scale / (counts * out.scale)
        result = torch.empty_like(sums)
        shape = sums.shape
        per_position = multipliers.expand(shape[-2:]) if sums.dim() == 4 else multipliers
        for value in torch.unique(per_position):  # one multiplier per distinct count
            where = (per_position == value).expand(shape)
            result[where] = self.requantize(sums[where], value, out)
        return result


class IntegerReLU(nn.Module):
    """ReLU on codes: a clamp at the zero point (the code of 0.0), and at the code of 6.0
    for ReLU6; ``clamp(x, 0, high)`` on float."""

    def __init__(self, step: plan.ReLU):
        super().__init__()
        self.zero_point = step.zero_point
        self.high = step.high

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        low = 0 if self.zero_point is None else self.zero_point
        return torch.clamp(q, min=low, max=self.high)


class IntegerFlatten(nn.Module):
    def __init__(self, step: plan.Flatten):
        super().__init__()
        self.start_dim, self.end_dim = step.start_dim, step.end_dim

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.flatten(self.start_dim, self.end_dim)


class IntegerInsertZeros(nn.Module):
    """Zeros (the zero point, on codes) between neighbouring positions and after the
    last (`lightning_qat.export.plan.InsertZeros`)."""

    def __init__(self, step: plan.InsertZeros):
        super().__init__()
        self.stride, self.end, self.fill = step.stride, step.end, step.fill

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        (s_h, s_w), (e_h, e_w) = self.stride, self.end
        height, width = q.shape[-2:]
        shape = (*q.shape[:-2], (height - 1) * s_h + 1 + e_h, (width - 1) * s_w + 1 + e_w)
        out = q.new_full(shape, self.fill)
        out[..., : (height - 1) * s_h + 1 : s_h, : (width - 1) * s_w + 1 : s_w] = q
        return out


class IntegerTranspose(nn.Module):
    def __init__(self, step: plan.Transpose):
        super().__init__()
        self.dims = step.dims

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.transpose(*self.dims)


class IntegerConstant(nn.Module):
    def __init__(self, step: plan.Constant):
        super().__init__()
        self.register_buffer("tensor", step.tensor)

    def forward(self) -> torch.Tensor:
        return self.tensor


class IntegerFloatOp(_Codes):
    """A float island on the dequantized input, in float32 as the fake-quant model runs
    it (its output is float; a reader quantizes it)."""

    def __init__(self, step: plan.FloatOp):
        super().__init__()
        self.op = step.op
        self.input_grid = step.input_grid
        self.attributes = step.attributes

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        x = self.dequantize(q, self.input_grid).float()
        a = self.attributes
        if self.op == "layer_norm":
            return F.layer_norm(x, x.shape[-1:], a["weight"], a["bias"], a["eps"])
        if self.op == "gelu":
            return F.gelu(x, approximate=a["approximate"])
        return x.mean(a["dims"], keepdim=a["keepdim"])  # "mean"


class IntegerAttention(_Codes):
    """Multi-head self-attention on codes (`lightning_qat.export.plan.Attention`): the
    projections and the output projection are `IntegerLayer` s; both attention products
    are integer sums of code products (exact in float64), the scores dequantized for the
    float softmax, the context requantized with a fixed-point multiplier."""

    def __init__(self, step: plan.Attention):
        super().__init__()
        self.heads = step.heads
        self.projections = nn.ModuleList(IntegerLayer(p) for p in step.projections)
        self.out_proj = IntegerLayer(step.out_proj)
        self.operand_grids = step.operand_grids
        self.attention_grid = step.attention_grid
        self.context_grid = step.context_grid

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = q.shape
        query, key, value = (
            (p(q) - g.zero_point)
            .reshape(batch, tokens, self.heads, -1)
            .transpose(1, 2)  # [N, H, T, d]
            .double()
            for p, g in zip(self.projections, self.operand_grids, strict=True)
        )
        s_q, s_k, s_v = (g.scale for g in self.operand_grids)
        scores = (query @ key.transpose(-2, -1)) * (s_q * s_k)  # exact sums, then scaled
        a = self.attention_grid
        probabilities = torch.softmax(scores.float(), dim=-1)
        codes = plan.quantize_codes(probabilities, a.scale, a.zero_point, a.qmin, a.qmax)
        context = (codes - a.zero_point).double() @ value  # exact integers
        multiplier = torch.tensor(a.scale * s_v / self.context_grid.scale, dtype=torch.float64)
        context = self.requantize(context.round().long(), multiplier, self.context_grid)
        return self.out_proj(context.transpose(1, 2).reshape(batch, tokens, width))


_STEPS = {
    plan.QuantizeInput: IntegerQuantizeInput,
    plan.Requantize: IntegerRequantize,
    plan.QuantizedLayer: IntegerLayer,
    plan.Add: IntegerAdd,
    plan.Concat: IntegerConcat,
    plan.Pool: IntegerPool,
    plan.ReLU: IntegerReLU,
    plan.Flatten: IntegerFlatten,
    plan.InsertZeros: IntegerInsertZeros,
    plan.Transpose: IntegerTranspose,
    plan.Constant: IntegerConstant,
    plan.FloatOp: IntegerFloatOp,
    plan.Attention: IntegerAttention,
}


class IntegerModel(nn.Module):
    """The integer-only model `to_integer` builds: its ``forward`` takes and returns float.

    ``steps`` run in order on named values (``inputs``/``values`` give each step's names).
    """

    def __init__(self, deployment: DeploymentPlan):
        super().__init__()
        self.steps = nn.ModuleList(_STEPS[type(step)](step) for step in deployment)
        self.inputs = [step.inputs for step in deployment]
        self.values = [step.value for step in deployment]
        self.input_name = deployment.input
        self.output_name = deployment.output
        self.output_grid = deployment.grids.get(deployment.output)

    def codes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every value the model computes (integer codes or float), by name, on the CPU."""
        values = {self.input_name: x.cpu()}
        for step, names, value in zip(self.steps, self.inputs, self.values, strict=True):
            values[value] = step(*(values[n] for n in names))
        return values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.codes(x)[self.output_name]
        return _Codes.dequantize(out, self.output_grid).float().to(x.device)


@torch.no_grad()
def to_integer(model: nn.Module) -> IntegerModel:
    """The integer-only equivalent of a trained QAT ``model`` (see the module docstring).

    The input is always quantized, also where training left the first layer's input float
    (``quantize_first_input=False``): an integer-only model has no float layer.

    Raises:
        ValueError: an op the integer model cannot run (named with its module path), or a
            layer that never observed its input.
    """
    return IntegerModel(on_cpu(plan_deployment(model)))


def on_cpu(value: Any) -> Any:
    """``value`` (a plan, its steps, their fields) with every tensor moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: on_cpu(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **fields)
    if isinstance(value, list | tuple):
        return type(value)(on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    return value
