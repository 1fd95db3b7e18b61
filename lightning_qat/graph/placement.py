"""Where a model's activations are quantized: exactly where the integer model holds codes.

DESIGN.md section 6: in eval, the fake-quant model holds a tensor on an integer grid
exactly where the integer model holds int8 codes. The integer model (Jacob et al. 2018,
section 2.2; TFLite's 8-bit specification; onnxruntime's QLinear kernels) holds codes

- at the input of every quantized Conv2d/Linear;
- at both inputs and the output of a residual add, at every input and the output of a
  concatenation (each input requantized to the output's grid, as onnxruntime's
  QLinearConcat does), at the input and output of an average pool that an integer op
  reads (the mean rounded on codes);

and max pooling, ReLU/ReLU6 (clamps on codes), flatten, dropout and identity keep the
grid of their input. So each *source* value (the output of a layer, add, concatenation,
pool, float op or the model input) that an integer op reads gets one grid, applied once:

- where it flows through grid-keeping ops into a single quantized layer, that layer's own
  ``activation_quantizer`` applies it (as on Sequential chains: LeNet, NIN);
- elsewhere (a residual add reads it, or several layers do), a standalone quantizer is
  applied where a module boundary outputs the value, as late as possible along the
  grid-keeping ops so that it sees what follows a ReLU (TFLite's fused activation): a
  forward hook on that module (`lightning_qat.graph.trace.QuantizeOutput`); the layers
  reading the value share it as their ``activation_quantizer`` and do not quantize again.

A value that no module boundary outputs (an add inside an expression such as
``torch.relu(a + b) * c``) cannot be quantized without rewriting ``forward``; the op
reading it stays float and is named, as are ops no integer runtime runs (float islands).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

from torch import fx, nn

from lightning_qat.graph.ops import INTEGER_OPS, SAME_GRID, Kind, Op, classify
from lightning_qat.graph.trace import TracedModel


@dataclass
class TensorQuantizer:
    """A standalone activation quantizer.

    Attributes:
        module: the module whose output it quantizes (a forward hook on it), or whose
            first input with ``on_input``.
        readers: the integer ops reading the quantized value, as ``where: what``.
        layers: the quantized layers among them; their ``activation_quantizer`` is this
            quantizer.
        on_input: quantizes the module's first input (a forward pre-hook) instead.
    """

    module: str
    readers: list[str]
    layers: list[str]
    on_input: bool = False


@dataclass
class Placement:
    """Where a model's activations are quantized, beyond each layer's own input.

    Attributes:
        tensor_quantizers: the standalone quantizers.
        float_ops: ops between integer ops that no integer runtime runs (float islands:
            deployment dequantizes before them and quantizes after).
        unquantized: integer ops whose input no module boundary outputs, so that it
            cannot be quantized; they run in float.
        opaque: modules the trace kept whole that hold layers (``Kind.OPAQUE``), by
            their name in the traced model: to be placed on their own.
        relus_into_layers: ``(relu, layer)``: an ``nn.ReLU`` module called once whose
            output only that layer reads, as its input (the layer's own input quantizer
            can apply the ReLU's gradient mask: `lightning_qat.nn.ReLUBeforeQuantizer`).
    """

    tensor_quantizers: list[TensorQuantizer] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    unquantized: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    relus_into_layers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def stays_float(self) -> list[str]:
        return self.float_ops + self.unquantized


def data_users(ops: dict[fx.Node, Op]) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the nodes that read it as a tensor input, in graph order."""
    users: dict[fx.Node, list[fx.Node]] = {node: [] for node in ops}
    for node, op in ops.items():
        for source in dict.fromkeys(op.inputs):
            users[source].append(node)
    return users


def integer_ops(ops: dict[fx.Node, Op], users: dict[fx.Node, list[fx.Node]]) -> set[fx.Node]:
    """The nodes that run on integers: every layer, and each add, concatenation and
    average pool whose output an integer op reads (through grid-keeping ops)."""
    integer: set[fx.Node] = set()
    reaches: dict[fx.Node, bool] = {}
    for node in reversed(list(ops)):
        op = ops[node]
        reaches[node] = any(
            user in integer or (ops[user].kind in SAME_GRID and reaches[user])
            for user in users[node]
        )
        if op.kind is Kind.LAYER or (op.kind in INTEGER_OPS and reaches[node]):
            integer.add(node)
    return integer


def _inside(node: fx.Node, module: str) -> bool:
    """Whether ``node`` is the call of ``module`` or runs inside it."""
    if node.op == "call_module" and node.target == module:
        return True
    return any(path == module for path, _ in node.meta.get("nn_module_stack", {}).values())


def _produces_integer(op: Op, integer: set[fx.Node]) -> bool:
    return op.kind is Kind.LAYER_BN or op.node in integer


def _relu_module(node: fx.Node, traced: TracedModel) -> str | None:
    """The name of the ``nn.ReLU`` module (exactly that class) whose one call ``node`` is."""
    if node.op != "call_module" or traced.calls[str(node.target)] != 1:
        return None
    return str(node.target) if type(traced.modules[str(node.target)]) is nn.ReLU else None


def place(traced: TracedModel, layers: Container[str] = (), prefix: str = "") -> Placement:
    """The quantization points of a traced float (or prepared) model; ``layers`` names
    the float Conv2d/Linear that will be quantized (see the module docstring). Names in
    the result start with ``prefix`` (the traced model's own name in a larger one)."""
    ops = classify(traced.graph, traced.modules, layers, prefix)
    users = data_users(ops)
    integer = integer_ops(ops, users)
    placement = Placement()
    placement.opaque = [str(n.target) for n, op in ops.items() if op.kind is Kind.OPAQUE]

    def readers(source: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
        """Integer ops and other ops reading ``source`` through grid-keeping ops."""
        integer_readers, others, stack = [], [], list(users[source])
        while stack:
            node = stack.pop(0)
            if node in integer:
                integer_readers.append(node)
            elif ops[node].kind in SAME_GRID:
                stack.extend(users[node])
            else:
                others.append(node)
        return integer_readers, others

    for source, op in ops.items():
        if op.kind in SAME_GRID or op.kind in (Kind.META, Kind.OUTPUT, Kind.QUANTIZER):
            continue
        integer_readers, _ = readers(source)
        if not integer_readers:
            continue
        chain = [source]
        while len(users[chain[-1]]) == 1 and ops[users[chain[-1]][0]].kind in SAME_GRID:
            chain.append(users[chain[-1]][0])
        last_users = users[chain[-1]]
        if len(last_users) == 1 and ops[last_users[0]].kind is Kind.LAYER:
            # the layer's own input quantizer
            relu = _relu_module(chain[-1], traced)
            if relu is not None and ops[last_users[0]].inputs[:1] == [chain[-1]]:
                where = ops[last_users[0]].where
                placement.relus_into_layers.append((f"{prefix}.{relu}" if prefix else relu, where))
            continue
        attach = next(
            (
                name
                for value in reversed(chain)
                for name in traced.outputs_of.get(value, [])
                if traced.calls[name] == 1
            ),
            None,
        )
        on_input = False
        if attach is None:  # a module called once that alone reads the value
            end = chain[-1]
            attach = next(
                (
                    name
                    for name in traced.inputs_of.get(end, [])
                    if traced.calls[name] == 1 and all(_inside(u, name) for u in last_users)
                ),
                None,
            )
            on_input = attach is not None
        if attach is None:
            where = ops[chain[-1]].label
            placement.unquantized += [
                f"{ops[r].label} (its input {where} is returned by no module, so it cannot "
                "be quantized)"
                for r in integer_readers
            ]
            continue
        placement.tensor_quantizers.append(
            TensorQuantizer(
                f"{prefix}.{attach}" if prefix else attach,
                [ops[r].label for r in integer_readers],
                [ops[r].where for r in integer_readers if ops[r].kind is Kind.LAYER],
                on_input,
            )
        )

    # Float islands: float ops that read codes and whose output an integer op reads.
    holds_codes: dict[fx.Node, bool] = {}
    reaches_integer = {node: bool(readers(node)[0]) for node in ops}
    for node, op in ops.items():
        holds_codes[node] = _produces_integer(op, integer) or (
            op.kind in SAME_GRID and any(holds_codes[i] for i in op.inputs)
        )
        floating = op.kind is Kind.FLOAT or (op.kind in INTEGER_OPS and node not in integer)
        if floating and reaches_integer[node] and any(holds_codes[i] for i in op.inputs):
            placement.float_ops.append(op.label)
    return placement
