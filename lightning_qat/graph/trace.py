"""A torch.fx trace of a model that knows where module boundaries are.

Quantization points are placed on *values* of the traced graph (DESIGN.md section 6),
but they can only be applied where a module boundary outputs that value: a forward hook
on the module (`QuantizeOutput`) changes what the module returns without touching any
``forward``. So the trace records, for every graph node, the modules whose call returned
it, and how often each module is called (a module called twice returns two values and
cannot carry one value's quantizer).

torch.fx runs the hooks of the modules it traces through but not those of leaf modules
(it records a ``call_module`` node instead of calling them); `GraphTracer` applies our
`QuantizeOutput` hooks of leaf modules itself, so the graph of a prepared model holds
every quantizer call that runs.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lightning_qat.nn import QUANTIZED_LAYERS, FoldedBatchNorm2d, ReLUBeforeQuantizer
from lightning_qat.quant import FakeQuantize

#: Modules the trace keeps whole (besides torch.nn's own, which torch.fx keeps whole).
LEAVES = (*QUANTIZED_LAYERS, FakeQuantize, FoldedBatchNorm2d, ReLUBeforeQuantizer)
#: The attributes under which a module holds the quantizer of its output / first input.
OUTPUT_QUANTIZER = "output_quantizer"
INPUT_QUANTIZER = "input_quantizer"


class QuantizeOutput:
    """Forward hook: the module returns its output through its ``output_quantizer``.

    A plain class (not a closure) so that models holding it pickle and deep-copy.
    """

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        return getattr(module, OUTPUT_QUANTIZER)(output)

    def __repr__(self) -> str:
        return "QuantizeOutput()"


class QuantizeInput:
    """Forward pre-hook: the module reads its first input through its ``input_quantizer``
    (a value that no module returns, read only inside this module)."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (getattr(module, INPUT_QUANTIZER)(args[0]), *args[1:])

    def __repr__(self) -> str:
        return "QuantizeInput()"


def quantizes_output(module: nn.Module) -> bool:
    """Whether ``module`` returns its output through an output quantizer."""
    return any(isinstance(h, QuantizeOutput) for h in module._forward_hooks.values())


def quantizes_input(module: nn.Module) -> bool:
    """Whether ``module`` reads its first input through an input quantizer."""
    return any(isinstance(h, QuantizeInput) for h in module._forward_pre_hooks.values())


class GraphTracer(fx.Tracer):
    """torch.fx tracer: quantized layers, quantizers and folded BatchNorms are leaves;
    records the modules whose call returned each node."""

    def __init__(self) -> None:
        super().__init__()
        self.module_outputs: list[tuple[str, fx.Node]] = []
        self.module_inputs: list[tuple[str, fx.Node]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        name = self.path_of_module(m)
        leaf = self.is_leaf_module(m, name)
        if args and isinstance(args[0], fx.Proxy) and name:
            self.module_inputs.append((name, args[0].node))
        if leaf and quantizes_input(m):  # a leaf's hooks do not run under fx: apply ours
            args = (getattr(m, INPUT_QUANTIZER)(args[0]), *args[1:])
        out = super().call_module(m, forward, args, kwargs)
        if leaf and quantizes_output(m):
            out = getattr(m, OUTPUT_QUANTIZER)(out)
        if isinstance(out, fx.Proxy) and name:
            self.module_outputs.append((name, out.node))
        return out


@dataclass
class TracedModel:
    """A model's graph with its module boundaries.

    Attributes:
        graph: the torch.fx graph.
        modules: the model's submodules by qualified name.
        outputs_of: for each node, the modules whose call returned it, innermost first.
        inputs_of: for each node, the modules called with it as first argument.
        calls: how many times each module is called in one forward pass.
    """

    graph: fx.Graph
    modules: dict[str, nn.Module]
    outputs_of: dict[fx.Node, list[str]] = field(default_factory=dict)
    inputs_of: dict[fx.Node, list[str]] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.graph.nodes)


def trace(model: nn.Module) -> TracedModel:
    """Trace ``model`` with `GraphTracer` (raises what torch.fx raises on untraceable
    code, e.g. data-dependent control flow)."""
    tracer = GraphTracer()
    graph = tracer.trace(model)
    outputs_of: dict[fx.Node, list[str]] = defaultdict(list)
    for name, node in tracer.module_outputs:  # inner calls finish first: innermost first
        outputs_of[node].append(name)
    inputs_of: dict[fx.Node, list[str]] = defaultdict(list)
    for name, node in tracer.module_inputs:  # outer calls start first: outermost first
        inputs_of[node].append(name)
    return TracedModel(
        graph=graph,
        modules=dict(model.named_modules(remove_duplicate=False)),
        outputs_of=dict(outputs_of),
        inputs_of=dict(inputs_of),
        calls=Counter(tracer.num_calls),
    )


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU if it has none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
