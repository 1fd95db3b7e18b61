"""ONNX export with QuantizeLinear/DequantizeLinear pairs that onnxruntime runs on int8
kernels.

`to_onnx` writes the steps of `plan_deployment` (the same numbers as the integer-only
reference `to_integer`) in the QDQ format: every quantized layer reads
``DequantizeLinear(codes)``, its weight is ``DequantizeLinear`` of int8 codes (per output
channel where trained so) and its bias ``DequantizeLinear`` of an int32 at scale
``s_x s_w``, and its output is ``QuantizeLinear``-ed to the next layer's input grid.
onnxruntime fuses each such group into one integer kernel (QLinearConv, QGemm).

The graph is written for what onnxruntime's fast x86/ARM kernels take (u8 activations,
s8 weights, a requantized output whose ReLU is implied by the output range):

- Activation codes are **uint8**: the code ``q`` in ``[qmin, qmax]`` of our grid becomes
  ``u = q - qmin`` with zero point ``z - qmin`` (the same real values). An asymmetric
  grid after a ReLU has ``z = qmin``, so the ReLU is a no-op on the codes and
  onnxruntime drops it; for a symmetric grid (``z = 0``) the ReLU is a ``Clip`` at the
  zero point on uint8 codes (Jacob et al. section 2.2: ReLU is a clamp at ``z``).
  A ``Clip`` also restores the narrow symmetric range and lower-bit ranges, which
  ``QuantizeLinear`` (saturating to [0, 255]) does not know.
- Each layer's output is requantized right after the layer, as in the integer model;
  max pooling then runs on the codes (it commutes with quantization); average pooling
  dequantizes, pools and requantizes to the same grid.
- The last layer's output is float (its accumulator dequantized), as in `to_integer`.

Where training left the first layer's input float (``quantize_first_input=False``,
the reference implementation's choice), the export does the same by default
(``quantize_input=None``): the first convolution then runs in float on int8 weights
dequantized once. ``quantize_input=True`` quantizes the input as the integer-only model
must, at the accuracy cost the app measures.

Numbers: onnxruntime requantizes with a float32 multiplier and rounds half to even, as
fake quantization rounds; the fake-quant model and the export then differ by at most one
step on rare rounding ties of the accumulator (tested).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lightning_qat.export import plan
from lightning_qat.export.plan import QuantGrid, plan_deployment

#: ONNX opset: per-axis QuantizeLinear/DequantizeLinear (13), uint8 Clip (12).
OPSET = 17
#: IR version 8 (ONNX 1.10+) loads in every onnxruntime of the last years.
IR_VERSION = 8
CODE_MAX = 255  # uint8


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
    """A uint8 code tensor of the graph, its grid, and the clamp still to apply to it."""

    def __init__(self, name: str, grid: QuantGrid):
        self.name = name
        self.grid = grid
        self.low = 0  # pending Clip bounds in uint8 codes
        self.high = grid.qmax - grid.qmin

    @property
    def zero_point(self) -> int:
        return self.grid.zero_point - self.grid.qmin


class _Exporter:
    def __init__(self, quantize_input: bool | None):
        self.graph = _GraphBuilder()
        self.input_policy = quantize_input
        self.value: str | _Codes = "input"  # the current tensor: float name or codes

    # codes <-> float
    def _scale_and_zero_point(self, grid: QuantGrid, base: str) -> list[str]:
        return [
            self.graph.constant(f"{base}_scale", np.float32(grid.scale)),
            self.graph.constant(f"{base}_zero_point", np.uint8(grid.zero_point - grid.qmin)),
        ]

    def quantize(self, name: str, grid: QuantGrid, base: str) -> _Codes:
        inputs = [name, *self._scale_and_zero_point(grid, base)]
        return _Codes(self.graph.node("QuantizeLinear", inputs, f"{base}_q"), grid)

    def codes(self) -> _Codes:
        """The current tensor as codes, its pending clamp applied."""
        codes = self.value
        assert isinstance(codes, _Codes)
        if codes.low > 0 or codes.high < CODE_MAX:
            bounds = [
                self.graph.constant(f"{codes.name}_min", np.uint8(codes.low)),
                self.graph.constant(f"{codes.name}_max", np.uint8(codes.high)),
            ]
            clipped = self.graph.node("Clip", [codes.name, *bounds], f"{codes.name}_clip")
            codes = _Codes(clipped, codes.grid)
            self.value = codes
        return codes

    def dequantized(self) -> str:
        if isinstance(self.value, str):
            return self.value
        codes = self.codes()
        inputs = [codes.name, *self._scale_and_zero_point(codes.grid, codes.name)]
        return self.graph.node("DequantizeLinear", inputs, f"{codes.name}_dq")

    # steps
    def input(self, step: plan.QuantizeInput) -> None:
        policy = self.input_policy
        keep_float = step.float_in_training if policy is None else not policy
        if not keep_float:  # the graph input, or its flattened view
            self.value = self.quantize(self.value, step.grid, "input")

    def layer(self, step: plan.QuantizedLayer) -> None:
        g = self.graph
        base = step.name.replace(".", "_") or step.kind
        x = self.dequantized()
        per_channel = step.weight_scale.dim() == 1
        axis = {"axis": 0} if per_channel else {}
        weight = g.node(
            "DequantizeLinear",
            [
                g.constant(f"{base}_weight_codes", _array(step.weight_codes, np.int8)),
                g.constant(f"{base}_weight_scale", _array(step.weight_scale, np.float32)),
                g.constant(f"{base}_weight_zero_point", _array(step.weight_zero_point, np.int8)),
            ],
            f"{base}_weight",
            **axis,
        )
        # the bias scale is s_x · s_w as float32, the product onnxruntime's kernels assume
        bias_scale = np.float32(step.input.scale) * _array(step.weight_scale, np.float32)
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
        self.value = out if step.output is None else self.quantize(out, step.output, base)

    def relu(self, step: plan.ReLU) -> None:
        if isinstance(self.value, str):
            self.value = self.graph.node("Relu", [self.value], f"{self.value}_relu")
        else:  # a clamp at the zero point, applied with the next Clip
            self.value.low = max(self.value.low, self.value.zero_point)

    def _on_codes_or_float(self, op: str, suffix: str, **attributes) -> None:
        """An op that commutes with quantization and clamping (max pooling, flattening):
        applied to the codes as they are, the pending clamp carried over to its (smaller
        or same-size) output."""
        value = self.value
        source = value.name if isinstance(value, _Codes) else value
        out = self.graph.node(op, [source], f"{source}_{suffix}", **attributes)
        if isinstance(value, _Codes):
            codes = _Codes(out, value.grid)
            codes.low, codes.high = value.low, value.high
            out = codes
        self.value = out

    def pool(self, step: plan.Pool) -> None:
        module = step.module
        if isinstance(module, nn.MaxPool2d):
            self._on_codes_or_float("MaxPool", "maxpool", **_pool_attributes(module))
            return
        grid = self.value.grid if isinstance(self.value, _Codes) else None
        x = self.dequantized()
        if isinstance(module, nn.AdaptiveAvgPool2d):
            size = module.output_size
            if size not in (1, (1, 1), [1, 1]):
                raise ValueError(f"to_onnx: AdaptiveAvgPool2d to {size}; only global (1) exports")
            pooled = self.graph.node("GlobalAveragePool", [x], f"{x}_avgpool")
        else:
            if module.divisor_override is not None:
                raise ValueError("to_onnx: AvgPool2d with divisor_override does not export")
            pooled = self.graph.node(
                "AveragePool",
                [x],
                f"{x}_avgpool",
                count_include_pad=int(module.count_include_pad),
                **_pool_attributes(module),
            )
        self.value = pooled if grid is None else self.quantize(pooled, grid, pooled)

    def flatten(self, step: plan.Flatten) -> None:
        if step.start_dim != 1 or step.end_dim != -1:
            raise ValueError("to_onnx: only Flatten(start_dim=1, end_dim=-1) exports")
        self._on_codes_or_float("Flatten", "flatten", axis=1)


def _array(tensor: torch.Tensor, dtype) -> np.ndarray:
    """A tensor's values as a numpy array of ``dtype`` (from any device); the integer
    values are in range by construction of the plan."""
    return tensor.detach().cpu().numpy().astype(dtype)


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, tuple | list) else [value, value]


def _pool_attributes(module: nn.Module) -> dict:
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride or module.kernel_size)
    padding = _pair(module.padding)
    attributes = dict(
        kernel_shape=kernel, strides=stride, pads=padding + padding, ceil_mode=int(module.ceil_mode)
    )
    if isinstance(module, nn.MaxPool2d):
        attributes["dilations"] = _pair(module.dilation)
    return attributes


@torch.no_grad()
def to_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    quantize_input: bool | None = None,
) -> Path:
    """Write the QDQ ONNX model of a trained QAT ``model`` to ``path`` (see the module
    docstring) and return the path.

    Args:
        model: a QAT model that `to_integer` accepts (quantized Conv2d/Linear, ReLU,
            pooling, Flatten in nested ``nn.Sequential``), trained or calibrated.
        path: the ``.onnx`` file to write.
        example_input: a batch of the model's input; its shape fixes the input shape
            except the batch dimension, which stays dynamic.
        quantize_input: ``None`` to treat the first layer's input as training did,
            ``True`` to quantize it (integer-only), ``False`` to keep it float.

    Raises:
        ValueError: a module the export cannot express (as `to_integer`).
    """
    was_training = model.training
    model.eval()
    try:
        steps = plan_deployment(model)
        output_shape = ["batch", *model(example_input).shape[1:]]
    finally:
        model.train(was_training)
    exporter = _Exporter(quantize_input)
    handlers = {
        plan.QuantizeInput: exporter.input,
        plan.QuantizedLayer: exporter.layer,
        plan.ReLU: exporter.relu,
        plan.Pool: exporter.pool,
        plan.Flatten: exporter.flatten,
    }
    for step in steps:
        handlers[type(step)](step)
    output = exporter.dequantized()
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
