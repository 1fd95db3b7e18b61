"""ONNX export with QuantizeLinear/DequantizeLinear pairs that onnxruntime runs on integer
kernels.

`to_onnx` writes the steps of `plan_deployment` (the same numbers as the integer-only
reference `to_integer`) in the QDQ format, which onnxruntime's graph optimizer fuses into
its integer kernels: ``DQ -> Conv/Gemm -> Q`` into QLinearConv/QGemm, ``DQ, DQ -> Add ->
Q`` into QLinearAdd, ``DQ... -> Concat -> Q`` into QLinearConcat, ``DQ -> AveragePool /
GlobalAveragePool -> Q`` into their QLinear forms; max pooling and flattening run on the
codes. Every layer's weight is ``DequantizeLinear`` of 8-bit codes (per output channel
where trained so) and its bias ``DequantizeLinear`` of an int32 at scale ``s_x s_w`` (a
float bias silently stops the fusion).

What onnxruntime's kernels take, and how the graph is shaped for them:

- Activation codes are **uint8**: the code ``q`` of our grid becomes ``u = q - offset``
  with zero point ``z - offset`` (the same real values). The offset is the grid's
  ``qmin``, or its zero point where a ReLU follows the requantization: then ``u`` starts
  at 0 and ``QuantizeLinear``'s saturation *is* the ReLU (onnxruntime drops the ReLU).
  A ``Clip`` on the codes restores ranges ``QuantizeLinear`` does not know (the narrow
  symmetric range, lower bit widths, ReLU6, a ReLU after a branch).
- **Weights, exact on every x86 CPU.** onnxruntime multiplies uint8 activations with
  int8 weights (U8S8) through ``vpmaddubsw`` on x86 CPUs without VNNI (AVX2, AVX-512
  before Cascade Lake): it adds two products into a *saturating* int16, wrong once
  ``|u1 w1 + u2 w2| > 32767`` (measured here: 4 x 255 x 127 computed as 66000 instead of
  129540; onnxruntime's quantization docs say so). With uint8 weights (U8U8, codes + 128)
  it widens to int16 first and is exact everywhere. ``weight_dtype="auto"`` (the
  default) writes int8 weights where the layer's input codes stay within 0..127 (then no
  pair can reach 32767: a symmetric grid after a ReLU) and uint8 weights elsewhere, so the
  file is exact on any CPU; ``"int8"`` forces int8 weights (onnxruntime's fastest path on
  CPUs with VNNI and on ARM, where U8S8 is exact), ``"uint8"`` forces uint8.
- The last layer's output is float (its accumulator dequantized), as in `to_integer`.

Where training left the first layer's input float (``quantize_first_input=False``, the
reference implementation's choice), the export does the same by default
(``quantize_input=None``): the first convolution then runs in float on int8 weights
dequantized once. ``quantize_input=True`` quantizes the input as the integer-only model
must, at the accuracy cost the app measures.

Numbers: onnxruntime requantizes with a float32 multiplier and rounds half to even, as
fake quantization rounds; the fake-quant model and the export then differ by at most one
step on rare rounding ties of the accumulator (tested).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:  # imported when exporting only (lazily, by lightning_qat.export)
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as error:
    raise ImportError("onnx is needed to export: pip install 'lightning-qat[export]'") from error

from lightning_qat.export import plan
from lightning_qat.export.integer import IntegerModel, on_cpu
from lightning_qat.export.plan import DeploymentPlan, QuantGrid, plan_deployment

#: ONNX opset: per-axis QuantizeLinear/DequantizeLinear (13), uint8 Clip (12).
OPSET = 17
#: IR version 8 (ONNX 1.10+) loads in every onnxruntime of the last years.
IR_VERSION = 8
CODE_MAX = 255  # uint8
#: Largest uint8 activation code with which int8 weights cannot saturate onnxruntime's
#: int16 pair sums on x86 without VNNI: 2 x 127 x 128 = 32512 <= 32767.
SAFE_INT8_INPUT = 127
WEIGHT_DTYPES = ("auto", "int8", "uint8")


class _GraphBuilder:
    """Nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def name(self, base: str) -> str:
        candidate, index = base, 1
        while candidate in self._names:
            candidate, index = f"{base}_{index}", index + 1
        self._names.add(candidate)
        return candidate

    def constant(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attributes) -> str:
        output = self.name(base)
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output


class _Codes:
    """A uint8 code tensor of the graph: ``u = q - offset`` on ``grid``, within
    ``[low, high]`` once ``clipped`` (else a ``Clip`` to that range is still to come)."""

    def __init__(self, name: str, grid: QuantGrid, offset: int):
        self.name = name
        self.grid = grid
        self.offset = offset
        self.low = max(0, grid.qmin - offset)
        self.high = min(CODE_MAX, grid.qmax - offset)
        # QuantizeLinear saturates to [0, 255] only
        self.clipped = self.low == 0 and self.high == CODE_MAX

    @property
    def zero_point(self) -> int:
        return self.grid.zero_point - self.offset

    def carried(self, name: str) -> _Codes:
        """The same codes under another tensor name (after an op that keeps them)."""
        codes = _Codes(name, self.grid, self.offset)
        codes.low, codes.high, codes.clipped = self.low, self.high, self.clipped
        return codes


class _Exporter:
    def __init__(
        self,
        deployment: DeploymentPlan,
        quantize_input: bool | None,
        weights: str,
        shapes: dict[str, tuple[int, ...]],
    ):
        if weights not in WEIGHT_DTYPES:
            raise ValueError(f"to_onnx(weight_dtype={weights!r}): use one of {WEIGHT_DTYPES}")
        self.plan = deployment
        #: each value's shape for the example input (reshapes and permutations need ranks)
        self.shapes = shapes
        self.graph = _GraphBuilder()
        self.input_policy = quantize_input
        self.weights = weights
        self.values: dict[str, str | _Codes] = {deployment.input: "input"}
        self.from_input = {deployment.input}  # the model input and flattened views of it

    # codes <-> float
    def _scale_and_zero_point(self, grid: QuantGrid, offset: int, base: str) -> list[str]:
        return [
            self.graph.constant(f"{base}_scale", np.float32(grid.scale)),
            self.graph.constant(f"{base}_zero_point", np.uint8(grid.zero_point - offset)),
        ]

    def _offset(self, value: str, grid: QuantGrid) -> int:
        """``grid.zero_point`` where the value's one reader is a ReLU on codes (its clamp is
        then the quantizer's saturation), else ``grid.qmin``."""
        readers = self.plan.consumers(value)
        relu = len(readers) == 1 and isinstance(readers[0], plan.ReLU)
        if relu and readers[0].zero_point is not None and grid.qmax - grid.zero_point <= CODE_MAX:
            return grid.zero_point
        return grid.qmin

    def quantize(self, name: str, grid: QuantGrid, value: str) -> _Codes:
        offset = self._offset(value, grid)
        inputs = [name, *self._scale_and_zero_point(grid, offset, value)]
        return _Codes(self.graph.node("QuantizeLinear", inputs, f"{value}_q"), grid, offset)

    def codes(self, value: str) -> _Codes:
        """The value as codes, its pending clamp applied (once)."""
        codes = self.values[value]
        assert isinstance(codes, _Codes)
        if not codes.clipped:
            bounds = [
                self.graph.constant(f"{codes.name}_min", np.uint8(codes.low)),
                self.graph.constant(f"{codes.name}_max", np.uint8(codes.high)),
            ]
            clipped = self.graph.node("Clip", [codes.name, *bounds], f"{codes.name}_clip")
            codes = codes.carried(clipped)
            codes.clipped = True
            self.values[value] = codes
        return codes

    def dequantized(self, value: str) -> str:
        """The value as float: a DequantizeLinear of its codes (one per reader, as the QDQ
        format wants), or the float tensor."""
        if isinstance(self.values[value], str):
            return self.values[value]
        codes = self.codes(value)
        inputs = [codes.name, *self._scale_and_zero_point(codes.grid, codes.offset, codes.name)]
        return self.graph.node("DequantizeLinear", inputs, f"{codes.name}_dq")

    def output(self, step: plan.Step, name: str, grid: QuantGrid | None) -> None:
        """Store a step's float result, requantized to ``grid`` if given."""
        self.values[step.value] = name if grid is None else self.quantize(name, grid, step.value)

    # steps
    def quantize_input(self, step: plan.QuantizeInput) -> None:
        (source,) = step.inputs
        keep_float = False
        if source in self.from_input:  # the model input: as trained, or as asked
            policy = self.input_policy
            keep_float = step.float_in_training if policy is None else not policy
        if keep_float:
            self.values[step.value] = self.values[source]
        else:
            self.values[step.value] = self.quantize(self.dequantized(source), step.grid, step.value)

    def _weight_dtype(self, source: str | _Codes) -> type:
        if self.weights != "auto":
            return {"int8": np.int8, "uint8": np.uint8}[self.weights]
        if isinstance(source, _Codes) and source.high > SAFE_INT8_INPUT:
            return np.uint8
        return np.int8

    def layer(self, step: plan.QuantizedLayer) -> None:
        (source,) = step.inputs
        shape = self.shapes[source]
        if step.kind == "linear" and len(shape) > 2:
            # Gemm (QGemm) takes matrices: tokens [N, T, E] as [N T, E] and back, the
            # reshapes on the codes
            flat, out = f"{source}_2d", f"{step.value}_2d"
            self._carry("Reshape", plan.Step((source,), flat), [self._shape([-1, shape[-1]])])
            self.shapes[flat] = (-1, shape[-1])
            self._layer(replace(step, inputs=(flat,), value=out))
            back = [-1, *shape[1:-1], step.weight_codes.shape[0]]
            self._carry("Reshape", plan.Step((out,), step.value), [self._shape(back)])
            return
        self._layer(step)

    def _shape(self, shape: list[int]) -> str:
        return self.graph.constant("shape", np.array(shape, dtype=np.int64))

    def _layer(self, step: plan.QuantizedLayer) -> None:
        g = self.graph
        base = step.name.replace(".", "_") or step.kind
        (source,) = step.inputs
        value = self.values[source]
        if isinstance(value, _Codes):
            value = self.codes(source)
        dtype = self._weight_dtype(value)
        shift = 128 if dtype is np.uint8 else 0  # uint8 weight codes: q_w + 128, same values
        one_zero_point = step.weight_zero_point.unique().numel() == 1
        if (
            step.kind == "conv"
            and step.output_grid is None
            and isinstance(value, _Codes)
            and one_zero_point  # onnxruntime's ConvInteger takes no per-channel zero points
        ):
            self._integer_conv_to_float(step, value, dtype, shift)
            return
        x = self.dequantized(source)
        per_channel = step.weight_scale.dim() == 1
        axis = {"axis": 0} if per_channel else {}
        weight = g.node(
            "DequantizeLinear",
            [
                g.constant(f"{base}_weight_codes", _array(step.weight_codes + shift, dtype)),
                g.constant(f"{base}_weight_scale", _array(step.weight_scale, np.float32)),
                g.constant(
                    f"{base}_weight_zero_point", _array(step.weight_zero_point + shift, dtype)
                ),
            ],
            f"{base}_weight",
            **axis,
        )
        # the bias scale is s_x · s_w as float32, the product onnxruntime's kernels assume
        bias_scale = np.float32(step.input_grid.scale) * _array(step.weight_scale, np.float32)
        bias = g.node(
            "DequantizeLinear",
            [
                g.constant(f"{base}_bias_codes", _array(step.bias, np.int32)),
                g.constant(f"{base}_bias_scale", np.broadcast_to(bias_scale, step.bias.shape)),
                g.constant(f"{base}_bias_zero_point", np.zeros(step.bias.shape, np.int32)),
            ],
            f"{base}_bias",
            axis=0,
        )
        if step.kind == "conv":
            args = step.conv_args
            padding = list(args["padding"])
            out = g.node(
                "Conv",
                [x, weight, bias],
                base,
                kernel_shape=list(step.weight_codes.shape[2:]),
                strides=list(args["stride"]),
                pads=padding + padding,
                dilations=list(args["dilation"]),
                group=args["groups"],
            )
        else:
            out = g.node("Gemm", [x, weight, bias], base, transB=1)
        self.output(step, out, step.output_grid)

    def _integer_conv_to_float(
        self, step: plan.QuantizedLayer, codes: _Codes, dtype: type, shift: int
    ) -> None:
        """A convolution whose output is float (nothing integer reads it, a ViT's patch
        embedding): onnxruntime has no QLinearConv with a float output and would run a
        float Conv on dequantized codes, so the int32 accumulator is written out:
        ``ConvInteger`` of the codes, plus the int32 bias, times ``s_x s_w``. Only for
        one weight zero point (symmetric weights, or per tensor): onnxruntime's
        ConvInteger refuses per-channel zero points, and such a layer stays a float
        Conv on its dequantized int8 codes."""
        g, base = self.graph, step.name.replace(".", "_") or step.kind
        channels = (1, -1, *[1] * (step.weight_codes.dim() - 2))
        args = step.conv_args
        padding = list(args["padding"])
        inputs = [
            codes.name,
            g.constant(f"{base}_weight_codes", _array(step.weight_codes + shift, dtype)),
            g.constant(f"{base}_x_zero_point", np.uint8(codes.zero_point)),
            g.constant(
                f"{base}_weight_zero_point",
                _array(step.weight_zero_point.flatten()[0] + shift, dtype),
            ),
        ]
        accumulator = g.node(
            "ConvInteger",
            inputs,
            f"{base}_acc",
            kernel_shape=list(step.weight_codes.shape[2:]),
            strides=list(args["stride"]),
            pads=padding + padding,
            dilations=list(args["dilation"]),
            group=args["groups"],
        )
        bias = g.constant(f"{base}_bias_codes", _array(step.bias.reshape(channels), np.int32))
        accumulator = g.node("Add", [accumulator, bias], f"{base}_acc_bias")
        scale = np.float32(step.input_grid.scale) * _array(step.weight_scale, np.float32)
        scale = g.constant(
            f"{base}_acc_scale", np.broadcast_to(scale, step.bias.shape).reshape(channels)
        )
        out = g.node("Cast", [accumulator], f"{base}_acc_float", to=TensorProto.FLOAT)
        self.values[step.value] = g.node("Mul", [out, scale], base)

    def requantize(self, step: plan.Requantize) -> None:
        """DequantizeLinear then QuantizeLinear onto the reader's grid."""
        (source,) = step.inputs
        self.output(step, self.dequantized(source), step.output_grid)

    def add(self, step: plan.Add) -> None:
        a, b = (self.dequantized(v) for v in step.inputs)
        self.output(step, self.graph.node("Add", [a, b], f"{step.value}_add"), step.output_grid)

    def concat(self, step: plan.Concat) -> None:
        parts = [self.dequantized(v) for v in step.inputs]
        out = self.graph.node("Concat", parts, f"{step.value}_concat", axis=step.dim)
        self.output(step, out, step.output_grid)

    def _carry(
        self, op: str, step: plan.Step, constants: list[str] | None = None, **attributes
    ) -> None:
        """An op that commutes with quantization and clamping (max pooling, flattening,
        reshapes, permutations), applied to the codes as they are, the pending clamp
        carried over; ``constants`` are its further inputs (a reshape's shape)."""
        (source,) = step.inputs
        value = self.values[source]
        name = value.name if isinstance(value, _Codes) else value
        inputs = [name, *(constants or [])]
        out = self.graph.node(op, inputs, f"{step.value}_{op.lower()}", **attributes)
        self.values[step.value] = value.carried(out) if isinstance(value, _Codes) else out
        if source in self.from_input:
            self.from_input.add(step.value)

    def pool(self, step: plan.Pool) -> None:
        spec = step.pool
        if spec.kind == "max":
            self._carry("MaxPool", step, **_pool_attributes(spec))
            return
        x = self.dequantized(step.inputs[0])
        if spec.global_pool:
            pooled = self.graph.node("GlobalAveragePool", [x], f"{step.value}_avgpool")
        else:
            pooled = self.graph.node(
                "AveragePool",
                [x],
                f"{step.value}_avgpool",
                count_include_pad=int(spec.count_include_pad),
                **_pool_attributes(spec),
            )
        if spec.global_pool and not spec.keepdim:  # a mean over H, W: (N, C)
            flat = f"{step.value}_pooled"
            self.output(plan.Step(step.inputs, flat), pooled, step.output_grid)
            self._carry("Flatten", plan.Step((flat,), step.value), axis=1)
            return
        self.output(step, pooled, step.output_grid)

    def relu(self, step: plan.ReLU) -> None:
        (source,) = step.inputs
        value = self.values[source]
        if isinstance(value, str):
            if step.high is None:
                out = self.graph.node("Relu", [value], f"{step.value}_relu")
            else:
                bounds = [
                    self.graph.constant(f"{step.value}_min", np.float32(0)),
                    self.graph.constant(f"{step.value}_max", np.float32(step.high)),
                ]
                out = self.graph.node("Clip", [value, *bounds], f"{step.value}_relu6")
            self.values[step.value] = out
            return
        codes = value.carried(value.name)  # a clamp at the zero point (and at 6.0), applied later
        low = max(codes.low, codes.zero_point)
        high = codes.high if step.high is None else min(codes.high, step.high - codes.offset)
        if (low, high) != (codes.low, codes.high):
            codes.low, codes.high, codes.clipped = low, high, False
        self.values[step.value] = codes

    def flatten(self, step: plan.Flatten) -> None:
        if step.end_dim != -1:
            raise ValueError("to_onnx: only Flatten(start_dim, end_dim=-1) exports")
        if step.start_dim == 1:
            self._carry("Flatten", step, axis=1)
        else:  # ONNX Flatten makes matrices: keep the leading dimensions (0: copied)
            self._carry("Reshape", step, [self._shape([0] * step.start_dim + [-1])])

    def insert_zeros(self, step: plan.InsertZeros) -> None:
        """Zero-point codes between neighbouring positions, on the uint8 codes (the zero
        point lies inside any pending clamp, so the clamp still applies after): each
        position ``[.., h, w]`` as a block ``[.., h, s_h, w, s_w]`` padded with the zero
        point, the blocks merged, the trailing fill cut to ``(H - 1) s + 1``, then the
        output padding added. A following ``DQ -> Conv -> Q`` stays one QLinearConv."""
        g = self.graph
        (source,) = step.inputs
        value = self.values[source]
        if not isinstance(value, _Codes):
            raise ValueError("to_onnx: zeros are inserted on codes only")
        (s_h, s_w), (e_h, e_w) = step.stride, step.end
        height, width = self.shapes[source][-2:]
        fill = g.constant(f"{step.value}_fill", np.uint8(value.zero_point))
        blocks = g.node(
            "Unsqueeze",
            [value.name, g.constant("axes", np.array([3, 5], dtype=np.int64))],
            f"{step.value}_blocks",
        )
        pads = np.array([0] * 6 + [0, 0, 0, s_h - 1, 0, s_w - 1], dtype=np.int64)
        padded = g.node("Pad", [blocks, g.constant("pads", pads), fill], f"{step.value}_pad")
        merged = g.node(
            "Reshape", [padded, self._shape([0, 0, height * s_h, width * s_w])], f"{step.value}_m"
        )
        spread = [(height - 1) * s_h + 1, (width - 1) * s_w + 1]
        out = g.node(
            "Slice",
            [
                merged,
                g.constant("starts", np.zeros(2, np.int64)),
                g.constant("ends", np.array(spread, np.int64)),
                g.constant("axes", np.array([2, 3], np.int64)),
            ],
            f"{step.value}_spread",
        )
        if (e_h, e_w) != (0, 0):
            pads = np.array([0, 0, 0, 0, 0, 0, e_h, e_w], dtype=np.int64)
            out = g.node("Pad", [out, g.constant("pads", pads), fill], f"{step.value}_end")
        self.values[step.value] = value.carried(out)

    def transpose(self, step: plan.Transpose) -> None:
        rank = len(self.shapes[step.inputs[0]])
        perm = list(range(rank))
        first, second = (d % rank for d in step.dims)
        perm[first], perm[second] = perm[second], perm[first]
        self._carry("Transpose", step, perm=perm)

    def constant(self, step: plan.Constant) -> None:
        self.values[step.value] = self.graph.constant(step.value, _array(step.tensor, np.float32))

    def float_op(self, step: plan.FloatOp) -> None:
        g, a, base = self.graph, step.attributes, step.value
        x = self.dequantized(step.inputs[0])
        if step.op == "layer_norm":
            width = self.shapes[step.inputs[0]][-1]
            weight = (
                np.ones(width, np.float32)
                if a["weight"] is None
                else _array(a["weight"], np.float32)
            )
            bias = (
                np.zeros(width, np.float32) if a["bias"] is None else _array(a["bias"], np.float32)
            )
            inputs = [x, g.constant(f"{base}_weight", weight), g.constant(f"{base}_bias", bias)]
            out = g.node("LayerNormalization", inputs, base, axis=-1, epsilon=float(a["eps"]))
        elif step.op == "gelu":
            out = self._gelu(x, base, a["approximate"])
        else:  # mean
            dims = list(a["dims"])
            out = g.node("ReduceMean", [x], base, axes=dims, keepdims=int(a["keepdim"]))
        self.values[step.value] = out

    def _gelu(self, x: str, base: str, approximate: str) -> str:
        """GELU from ONNX primitives (a Gelu op needs opset 20; onnxruntime fuses these):
        ``x Φ(x) = x (1 + erf(x / sqrt 2)) / 2``, or the tanh form."""
        g = self.graph

        def const(value: float) -> str:
            return g.constant(f"{base}_c", np.float32(value))

        if approximate == "tanh":
            cube = g.node("Mul", [g.node("Mul", [x, x], f"{base}_sq"), x], f"{base}_cube")
            inner = g.node(
                "Add", [x, g.node("Mul", [cube, const(0.044715)], f"{base}_k")], f"{base}_in"
            )
            core = g.node(
                "Tanh",
                [g.node("Mul", [inner, const(math.sqrt(2 / math.pi))], f"{base}_s")],
                f"{base}_tanh",
            )
        else:
            core = g.node(
                "Erf", [g.node("Div", [x, const(math.sqrt(2))], f"{base}_div")], f"{base}_erf"
            )
        half = g.node("Mul", [x, const(0.5)], f"{base}_half")
        return g.node("Mul", [half, g.node("Add", [core, const(1.0)], f"{base}_one")], base)

    def attention(self, step: plan.Attention) -> None:
        g, base = self.graph, step.value
        (source,) = step.inputs
        shape = self.shapes[source]
        heads, width = step.heads, shape[-1]
        for projection in step.projections:  # Q, K, V codes on their operand grids
            self.shapes[projection.inputs[0]] = shape
            self.layer(projection)

        def split(projection: plan.QuantizedLayer, perm: list[int]) -> tuple[str, _Codes]:
            codes = self.codes(projection.value)
            heads_shape = self._shape([0, 0, heads, width // heads])
            split = g.node("Reshape", [codes.name, heads_shape], f"{projection.value}_heads")
            return g.node("Transpose", [split], f"{projection.value}_t", perm=perm), codes

        (q, q_codes), (k, k_codes), (v, v_codes) = (
            split(p, perm)
            for p, perm in zip(
                step.projections, ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]), strict=True
            )
        )
        # QK^T: an integer product (MatMulInteger), dequantized for the softmax
        zero_points = [
            g.constant(f"{base}_zq", np.uint8(q_codes.zero_point)),
            g.constant(f"{base}_zk", np.uint8(k_codes.zero_point)),
        ]
        products = g.node("MatMulInteger", [q, k, *zero_points], f"{base}_qk")
        s_q, s_k = step.operand_grids[0].scale, step.operand_grids[1].scale
        scores = g.node(
            "Mul",
            [
                g.node("Cast", [products], f"{base}_qk_f", to=TensorProto.FLOAT),
                g.constant(f"{base}_sqk", np.float32(s_q * s_k)),
            ],
            f"{base}_scores",
        )
        softmax = g.node("Softmax", [scores], f"{base}_softmax", axis=-1)
        p = self.quantize(softmax, step.attention_grid, f"{base}_p")
        # P V: DQ, DQ -> MatMul -> Q, which onnxruntime runs as QLinearMatMul
        p_dq = g.node(
            "DequantizeLinear",
            [p.name, *self._scale_and_zero_point(p.grid, p.offset, p.name)],
            f"{base}_p_dq",
        )
        v_dq = g.node(
            "DequantizeLinear",
            [v, *self._scale_and_zero_point(v_codes.grid, v_codes.offset, f"{base}_v")],
            f"{base}_v_dq",
        )
        context = self.quantize(
            g.node("MatMul", [p_dq, v_dq], f"{base}_pv"), step.context_grid, f"{base}_context"
        )
        merged = g.node("Transpose", [context.name], f"{base}_merge", perm=[0, 2, 1, 3])
        flat = g.node("Reshape", [merged, self._shape([0, 0, width])], f"{base}_context_flat")
        (context_value,) = step.out_proj.inputs
        self.values[context_value] = context.carried(flat)
        self.shapes[context_value] = shape
        self.layer(step.out_proj)


def _array(tensor: torch.Tensor, dtype) -> np.ndarray:
    """A tensor's values as a numpy array of ``dtype`` (from any device); the integer
    values are in range by construction of the plan."""
    return tensor.detach().cpu().numpy().astype(dtype)


def _pool_attributes(spec: plan.PoolSpec) -> dict:
    attributes = dict(
        kernel_shape=list(spec.kernel),
        strides=list(spec.stride),
        pads=list(spec.padding) * 2,
        ceil_mode=int(spec.ceil_mode),
    )
    if spec.kind == "max":
        attributes["dilations"] = list(spec.dilation)
    return attributes


@torch.no_grad()
def to_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    quantize_input: bool | None = None,
    weight_dtype: str = "auto",
) -> Path:
    """Write the QDQ ONNX model of a trained QAT ``model`` to ``path`` (see the module
    docstring) and return the path.

    Args:
        model: a QAT model that `plan_deployment` accepts (quantized Conv2d/Linear,
            BatchNorm, ReLU/ReLU6, residual add, concatenation, pooling, flatten), trained
            or calibrated.
        path: the ``.onnx`` file to write.
        example_input: a batch of the model's input; its shape fixes the input shape
            except the batch dimension, which stays dynamic.
        quantize_input: ``None`` to treat the first layer's input as training did,
            ``True`` to quantize it (integer-only), ``False`` to keep it float.
        weight_dtype: ``"auto"`` (exact on every CPU), ``"int8"`` or ``"uint8"``; see the
            module docstring.

    Raises:
        ValueError: an op the export cannot express (named, as by `plan_deployment`).
    """
    was_training = model.training
    model.eval()
    try:
        # (on the CPU, as the integer reference runs: its tensors go into the file)
        deployment = on_cpu(plan_deployment(model))
        output_shape = ["batch", *model(example_input).shape[1:]]
    finally:
        model.train(was_training)
    integer = IntegerModel(deployment)
    shapes = {name: tuple(v.shape) for name, v in integer.codes(example_input).items()}
    exporter = _Exporter(deployment, quantize_input, weight_dtype, shapes)
    handlers = {
        plan.QuantizeInput: exporter.quantize_input,
        plan.Requantize: exporter.requantize,
        plan.QuantizedLayer: exporter.layer,
        plan.Add: exporter.add,
        plan.Concat: exporter.concat,
        plan.Pool: exporter.pool,
        plan.ReLU: exporter.relu,
        plan.Flatten: exporter.flatten,
        plan.InsertZeros: exporter.insert_zeros,
        plan.Transpose: exporter.transpose,
        plan.Constant: exporter.constant,
        plan.FloatOp: exporter.float_op,
        plan.Attention: exporter.attention,
    }
    for step in deployment:
        handlers[type(step)](step)
    output = exporter.dequantized(deployment.output)
    graph = exporter.graph
    graph.nodes.append(helper.make_node("Identity", [output], ["logits"], name="logits"))
    input_shape = ["batch", *example_input.shape[1:]]
    onnx_graph = helper.make_graph(
        graph.nodes,
        type(model).__name__,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, output_shape)],
        graph.initializers,
    )
    proto = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="lightning-qat",
        doc_string="QDQ int8 export of a quantization-aware-trained model (lightning_qat.to_onnx)",
    )
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    return path
