"""What each node of a traced model is, as far as integer deployment cares.

Kinds (DESIGN.md section 6, the TFLite 8-bit specification and onnxruntime's QDQ
fusions):

- ``LAYER``: a Conv2d or Linear that is (or will be) quantized: its input is read as
  codes, its int32 accumulator requantized to the grid of the tensor's next consumer.
- ``LAYER_BN``: the BatchNorm right after a layer (folded into it on deployment): the
  value that leaves the layer.
- ``ADD`` (residual add), ``CAT`` (concatenation), ``AVGPOOL``: integer ops with their
  own output grid; every input on a grid.
- ``MAXPOOL``, ``RELU`` (ReLU, ReLU6: a clamp on codes), ``FLATTEN``, ``PERMUTE``
  (``transpose``), ``IDENTITY``
  (dropout, identity, a folded BatchNorm's pass-through, ``contiguous``): ops that keep
  the grid of their input (they commute with quantization).
- ``QUANTIZER``: an activation quantizer applied to a value (a prepared model).
- ``OPAQUE``: a module torch.fx keeps whole (torch's ``TransformerEncoder``) that holds
  quantized layers: placed on its own, inside; the export cannot write it.
- ``INPUT``, ``OUTPUT``, ``CONST`` (a parameter or buffer read in ``forward``), ``META``
  (sizes and shapes, not tensors) and ``FLOAT``: anything else, which no integer
  runtime runs (a float island).
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Container
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_qat.nn import QUANTIZED_LAYERS, FoldedBatchNorm2d
from lightning_qat.quant import FakeQuantize


class Kind(enum.Enum):
    INPUT = "input"
    OUTPUT = "output"
    CONST = "const"
    META = "meta"
    LAYER = "layer"
    LAYER_BN = "layer_bn"
    QUANTIZER = "quantizer"
    OPAQUE = "opaque"
    ADD = "add"
    CAT = "cat"
    AVGPOOL = "avgpool"
    MAXPOOL = "maxpool"
    RELU = "relu"
    FLATTEN = "flatten"
    PERMUTE = "permute"
    IDENTITY = "identity"
    FLOAT = "float"


#: Ops whose output is on the grid of their input.
SAME_GRID = frozenset({Kind.MAXPOOL, Kind.RELU, Kind.FLATTEN, Kind.PERMUTE, Kind.IDENTITY})
#: Ops that run on integers when something integer reads their output.
INTEGER_OPS = frozenset({Kind.ADD, Kind.CAT, Kind.AVGPOOL})


@dataclass(frozen=True)
class PoolSpec:
    """A 2-d (or, with 1-tuples, 1-d) pooling window. ``global_pool`` pools each whole
    map (adaptive to size 1, or a mean over the spatial dimensions, ``keepdim`` as
    given)."""

    kind: str  # "max" or "avg"
    kernel: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = True
    global_pool: bool = False
    keepdim: bool = True

    def as_2d(self) -> PoolSpec:
        """The same window over a ``[N, C, 1, L]`` view of a 1-d map (torch's 2-d
        kernels then pool 1-d maps too; ``divisor_override`` exists only there)."""
        if len(self.kernel) == 2:
            return self
        return replace(
            self,
            kernel=(1, *self.kernel),
            stride=(1, *self.stride),
            padding=(0, *self.padding),
            dilation=(1, *self.dilation),
        )


@dataclass
class Op:
    """One node of the graph, classified.

    Attributes:
        node: the torch.fx node.
        kind: what it is for deployment.
        inputs: the nodes of its tensor inputs (data, not sizes or constants).
        where: the module whose ``forward`` runs it ('' for the model's own forward), or
            the module itself for a module call.
        what: a short description for messages, e.g. ``add (conv2 + x)``.
        params: kind-specific: ``module`` (a module call), ``pool`` (`PoolSpec`),
            ``dim`` (concatenation axis), ``start_dim`` (flatten), ``high`` (ReLU6's 6.0).
    """

    node: fx.Node
    kind: Kind
    inputs: list[fx.Node] = field(default_factory=list)
    where: str = ""
    what: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``where: what``, as errors and warnings name an op."""
        return f"{self.where}: {self.what}" if self.where else self.what


_LAYER_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)}
_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_IDENTITY_FUNCTIONS = {F.dropout, F.dropout2d, torch.dropout}
_IDENTITY_METHODS = {"contiguous"}
_META_METHODS = {"size", "dim", "numel"}
_SYMBOLS = {
    operator.add: "+",
    operator.iadd: "+",
    operator.sub: "-",
    operator.mul: "*",
    operator.truediv: "/",
    operator.matmul: "@",
}


def _pair(value: Any) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


#: (max, average, adaptive average) pooling modules by number of spatial dimensions
_POOL_MODULES = {
    1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d),
    2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d),
}


def _pool_from_module(module: nn.Module) -> PoolSpec | None:
    for dims, (max_pool, avg_pool, adaptive_pool) in _POOL_MODULES.items():

        def size(value: Any, dims: int = dims) -> tuple[int, ...]:
            return tuple(value) if isinstance(value, tuple | list) else (value,) * dims

        if isinstance(module, max_pool) and not module.return_indices:
            return PoolSpec(
                "max",
                size(module.kernel_size),
                size(module.stride or module.kernel_size),
                size(module.padding),
                size(module.dilation),
                module.ceil_mode,
            )
        if isinstance(module, avg_pool) and getattr(module, "divisor_override", None) is None:
            return PoolSpec(
                "avg",
                size(module.kernel_size),
                size(module.stride or module.kernel_size),
                size(module.padding),
                ceil_mode=module.ceil_mode,
                count_include_pad=module.count_include_pad,
            )
        if isinstance(module, adaptive_pool) and size(module.output_size) == (1,) * dims:
            return PoolSpec("avg", global_pool=True)
    return None


def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pool_from_function(node: fx.Node) -> PoolSpec | None:
    target = node.target
    if target in (F.max_pool2d, torch.max_pool2d):
        kernel = _argument(node, 1, "kernel_size", None)
        stride = _argument(node, 2, "stride", None) or kernel
        if _argument(node, 6, "return_indices", False):
            return None
        return PoolSpec(
            "max",
            _pair(kernel),
            _pair(stride),
            _pair(_argument(node, 3, "padding", 0)),
            _pair(_argument(node, 4, "dilation", 1)),
            bool(_argument(node, 5, "ceil_mode", False)),
        )
    if target is F.avg_pool2d:
        if _argument(node, 6, "divisor_override", None) is not None:
            return None
        kernel = _argument(node, 1, "kernel_size", None)
        return PoolSpec(
            "avg",
            _pair(kernel),
            _pair(_argument(node, 2, "stride", None) or kernel),
            _pair(_argument(node, 3, "padding", 0)),
            ceil_mode=bool(_argument(node, 4, "ceil_mode", False)),
            count_include_pad=bool(_argument(node, 5, "count_include_pad", True)),
        )
    if target is F.adaptive_avg_pool2d and _pair(_argument(node, 1, "output_size", None)) == (1, 1):
        return PoolSpec("avg", global_pool=True)
    return None


def _spatial_mean(node: fx.Node) -> PoolSpec | None:
    """``x.mean((2, 3))`` / ``torch.mean(x, dim=(-2, -1), keepdim=...)``: a global average
    pool of an NCHW tensor."""
    dims = _argument(node, 1, "dim", None)
    if isinstance(dims, tuple | list) and sorted(dims) in ([2, 3], [-2, -1]):
        return PoolSpec("avg", global_pool=True, keepdim=bool(_argument(node, 2, "keepdim", False)))
    return None


def _is_meta(value: Any, meta: Container[fx.Node]) -> bool:
    """A size, a shape or a number computed from them (not a tensor)."""
    if isinstance(value, fx.Node):
        return value in meta
    if isinstance(value, tuple | list):
        return all(_is_meta(v, meta) for v in value)
    return isinstance(value, int | float | bool | str | type(None) | torch.dtype)


def _tensor_args(node: fx.Node, meta: Container[fx.Node]) -> list[fx.Node]:
    found: list[fx.Node] = []

    def visit(value: Any) -> None:
        if isinstance(value, fx.Node):
            if value not in meta:
                found.append(value)
        elif isinstance(value, tuple | list):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(node.args)
    visit(node.kwargs)
    return found


def _owner(node: fx.Node) -> str:
    """The module whose ``forward`` holds ``node`` ('' for the traced model's own)."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if node.op == "call_module":
        stack = stack[:-1]  # the module itself
    return stack[-1][0] if stack else ""


def _short(node: Any, owner: str, depth: int = 1, nested: bool = False) -> str:
    """A readable rendering of a value, e.g. ``conv2`` or ``x * sigmoid(x)``."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        target = str(node.target)
        return target[len(owner) + 1 :] if owner and target.startswith(owner + ".") else target
    if node.op in ("placeholder", "get_attr"):
        return node.name
    name = getattr(node.target, "__name__", str(node.target)).strip("_")
    if depth <= 0:
        return f"{name}(...)"
    if node.op == "call_function" and node.target in _SYMBOLS and len(node.args) == 2:
        left, right = (_short(a, owner, depth - 1, nested=True) for a in node.args)
        text = f"{left} {_SYMBOLS[node.target]} {right}"
        return f"({text})" if nested else text
    args = node.args[1:] if node.op == "call_method" else node.args
    inner = ", ".join(_short(a, owner, depth - 1) for a in args if isinstance(a, fx.Node))
    if node.op == "call_method":
        return f"{_short(node.args[0], owner, depth - 1, nested=True)}.{name}({inner})"
    return f"{name}({inner})"


def _describe(node: fx.Node, owner: str) -> str:
    """``mul (x * sigmoid(x))``: the op's name and the expression it computes."""
    name = getattr(node.target, "__name__", str(node.target)).strip("_")
    return f"{name} ({_short(node, owner, depth=2)})"


class Classifier:
    """Classifies the nodes of a traced model.

    Args:
        modules: the model's submodules by qualified name.
        layers: names of the float Conv2d/Linear layers that will be quantized (for a
            model not yet prepared); quantized layers are layers whatever this says.
    """

    def __init__(
        self, modules: dict[str, nn.Module], layers: Container[str] = (), prefix: str = ""
    ):
        self.modules = modules
        self.layers = layers
        self.prefix = prefix
        self.meta: set[fx.Node] = set()
        self.ops: dict[fx.Node, Op] = {}

    def classify(self, graph: fx.Graph) -> dict[fx.Node, Op]:
        for node in graph.nodes:
            self.ops[node] = self._classify(node)
        return self.ops

    def _op(self, node: fx.Node, kind: Kind, inputs=None, what: str = "", **params) -> Op:
        owner = _owner(node)
        if node.op == "call_module":
            where = str(node.target)
            module = self.modules[where]
            what = what or type(module).__name__
            params.setdefault("module", module)
        else:
            where = owner
            what = what or _describe(node, owner)
        if inputs is None:
            inputs = _tensor_args(node, self.meta)
        if self.prefix:
            where = f"{self.prefix}.{where}" if where else self.prefix
        return Op(node, kind, inputs, where, what, params)

    def _classify(self, node: fx.Node) -> Op:
        if node.op == "placeholder":
            return Op(node, Kind.INPUT, [], "", f"input {node.name}")
        if node.op == "output":
            return Op(node, Kind.OUTPUT, _tensor_args(node, self.meta), "", "output")
        if node.op == "get_attr":
            return Op(node, Kind.CONST, [], _owner(node), f"{node.target}")
        if node.op == "call_module":
            return self._module_op(node)
        return self._function_op(node)

    def _module_op(self, node: fx.Node) -> Op:
        module = self.modules[str(node.target)]
        name = str(node.target)
        data = _tensor_args(node, self.meta)[:1]
        if isinstance(module, QUANTIZED_LAYERS) or name in self.layers:
            return self._op(node, Kind.LAYER, data)
        if isinstance(module, FakeQuantize):
            return self._op(node, Kind.QUANTIZER, data)
        if isinstance(module, FoldedBatchNorm2d | nn.Identity | nn.Dropout | nn.Dropout2d):
            return self._op(node, Kind.IDENTITY, data)
        if isinstance(module, _LAYER_BN) and self._follows_a_layer(node):
            return self._op(node, Kind.LAYER_BN, data)
        if isinstance(module, nn.ReLU):
            return self._op(node, Kind.RELU, data)
        if isinstance(module, nn.ReLU6):
            return self._op(node, Kind.RELU, data, high=6.0)
        if isinstance(module, nn.Hardtanh) and module.min_val == 0 and module.max_val > 0:
            return self._op(node, Kind.RELU, data, high=float(module.max_val))
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return self._op(node, Kind.FLATTEN, data, start_dim=1)
        pool = _pool_from_module(module)
        if pool is not None:
            kind = Kind.MAXPOOL if pool.kind == "max" else Kind.AVGPOOL
            return self._op(node, kind, data, pool=pool)
        if any(isinstance(m, QUANTIZED_LAYERS) for m in module.modules()) or any(
            layer.startswith(f"{name}.") for layer in self.layers
        ):
            return self._op(node, Kind.OPAQUE)
        return self._op(node, Kind.FLOAT)

    def _follows_a_layer(self, node: fx.Node) -> bool:
        """A BatchNorm whose input is a layer's output read by nothing else: folded into
        the layer on deployment (or in training)."""
        source = node.args[0] if node.args else None
        return (
            isinstance(source, fx.Node)
            and len(source.users) == 1
            and self.ops.get(source) is not None
            and self.ops[source].kind is Kind.LAYER
            and isinstance(
                self.ops[source].params.get("module"), nn.Conv1d | nn.Conv2d | nn.ConvTranspose2d
            )
        )

    def _function_op(self, node: fx.Node) -> Op:
        target = node.target
        method = target if node.op == "call_method" else None
        args = node.args
        if (
            method in _META_METHODS
            or target is getattr
            or target is len
            or (
                node.op == "call_function"
                and target in (operator.getitem, *_SYMBOLS, operator.floordiv, operator.neg)
                and all(_is_meta(a, self.meta) for a in args)
            )
        ):
            self.meta.add(node)
            return Op(node, Kind.META, [], _owner(node), str(target))
        tensors = _tensor_args(node, self.meta)
        if target in _ADD_FUNCTIONS or method in _ADD_METHODS:
            alpha = node.kwargs.get("alpha", 1)
            if len(tensors) == 2 and alpha == 1 and len(args) == 2:
                return self._op(node, Kind.ADD, tensors)
            return self._op(node, Kind.FLOAT, tensors)
        if target in _CAT_FUNCTIONS:
            return self._op(node, Kind.CAT, tensors, dim=_argument(node, 1, "dim", 0))
        if target in _RELU_FUNCTIONS or method in _RELU_METHODS:
            return self._op(node, Kind.RELU, tensors[:1])
        if target is F.relu6:
            return self._op(node, Kind.RELU, tensors[:1], high=6.0)
        if target is F.hardtanh and args[1:3] == (0.0, 6.0):
            return self._op(node, Kind.RELU, tensors[:1], high=6.0)
        if target in _IDENTITY_FUNCTIONS or method in _IDENTITY_METHODS:
            return self._op(node, Kind.IDENTITY, tensors[:1])
        if target is torch.flatten or method == "flatten":
            start = _argument(node, 1, "start_dim", 0)
            end = _argument(node, 2, "end_dim", -1)
            if isinstance(start, int) and start >= 1 and end == -1:
                return self._op(node, Kind.FLATTEN, tensors[:1], start_dim=start)
        if target is torch.transpose or method == "transpose":
            dims = (_argument(node, 1, "dim0", None), _argument(node, 2, "dim1", None))
            if all(isinstance(d, int) for d in dims) and 0 not in dims:  # the batch stays
                return self._op(node, Kind.PERMUTE, tensors[:1], dims=dims)
        if target is operator.getitem and args[1:] == (0,) and self._is_attention(args[0]):
            return self._op(node, Kind.IDENTITY, tensors[:1])  # mha(...)[0]: its output
        if method in ("view", "reshape") and self._is_batch_flatten(node):
            return self._op(node, Kind.FLATTEN, tensors[:1], start_dim=1)
        if node.op == "call_function":
            pool = _pool_from_function(node)
            if pool is not None:
                kind = Kind.MAXPOOL if pool.kind == "max" else Kind.AVGPOOL
                return self._op(node, kind, tensors[:1], pool=pool)
        if target is torch.mean or method == "mean":
            pool = _spatial_mean(node)
            if pool is not None:
                return self._op(node, Kind.AVGPOOL, tensors[:1], pool=pool)
        return self._op(node, Kind.FLOAT, tensors)

    def _is_attention(self, value: Any) -> bool:
        """Whether ``value`` is what an attention module returns (output, weights)."""
        return (
            isinstance(value, fx.Node)
            and value.op == "call_module"
            and isinstance(self.modules[str(value.target)], nn.MultiheadAttention)
        )

    def _is_batch_flatten(self, node: fx.Node) -> bool:
        """``x.view(x.size(0), -1)`` or ``x.reshape(x.shape[0], -1)``."""
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        if len(shape) != 2 or shape[1] != -1 or not isinstance(shape[0], fx.Node):
            return False
        size = shape[0]
        source = node.args[0]
        if size.op == "call_method" and size.target == "size":
            return size.args[0] is source and _argument(size, 1, "dim", None) == 0
        if size.target is operator.getitem and size.args[1] == 0:
            shape_node = size.args[0]
            return (
                isinstance(shape_node, fx.Node)
                and shape_node.target is getattr
                and shape_node.args == (source, "shape")
            ) or (
                isinstance(shape_node, fx.Node)
                and shape_node.op == "call_method"
                and shape_node.target == "size"
                and shape_node.args == (source,)
            )
        return False


def classify(
    graph: fx.Graph, modules: dict[str, nn.Module], layers: Container[str] = (), prefix: str = ""
) -> dict[fx.Node, Op]:
    """``{node: Op}`` for every node of ``graph`` (see `Classifier`); ``where`` names start
    with ``prefix``."""
    return Classifier(modules, layers, prefix).classify(graph)
