"""`prepare_qat`: convert a float model to fake-quant layers, in place."""

from __future__ import annotations

import fnmatch
import itertools
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_qat.graph import (
    INPUT_QUANTIZER,
    OUTPUT_QUANTIZER,
    Placement,
    QuantizeInput,
    QuantizeOutput,
    place,
    trace,
)
from lightning_qat.graph.trace import module_device
from lightning_qat.nn import (
    QUANTIZED_LAYERS,
    FoldedBatchNorm2d,
    QuantConv2d,
    QuantConvBn2d,
    QuantLinear,
)
from lightning_qat.quant import FakeQuantize, QuantConfig

FLOAT_LAYERS = (nn.Conv2d, nn.Linear)
#: What can be folded: BatchNorm2d, and SyncBatchNorm (Lightning's sync_batchnorm=True
#: converts BatchNorm2d to it before training starts).
FOLDABLE_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _is_float_layer(module: nn.Module) -> bool:
    return isinstance(module, FLOAT_LAYERS) and not isinstance(module, QUANTIZED_LAYERS)


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(bn) in FOLDABLE_BN  # not subclasses, whose forward may differ
        and bn.track_running_stats
        and _is_float_layer(conv)
        and isinstance(conv, nn.Conv2d)
        and bn.num_features == conv.out_channels
    )


def _trace_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """Conv->BN pairs and the order of conv/linear calls, from a torch.fx trace.

    A pair is folded only when the BN's input is the conv's output and nothing else reads
    that output, and each module is called once (a reused module cannot be folded).
    """
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module"]
    times_called = Counter(n.target for n in calls)
    order = list(dict.fromkeys(n.target for n in calls if _is_float_layer(modules[n.target])))
    pairs = []
    for node in calls:
        if not isinstance(modules[node.target], FOLDABLE_BN) or not node.args:
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and len(src.users) == 1
            and times_called[src.target] == 1
            and times_called[node.target] == 1
            and _foldable(modules[src.target], modules[node.target])
        ):
            pairs.append((src.target, node.target))
    return pairs, order


def _prefixed(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _analyse(
    model: nn.Module, prefix: str = ""
) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, Exception]]]:
    """Foldable pairs, conv/linear call order and the modules that did not trace.

    Traces ``model`` whole; where that fails (data-dependent control flow, say), traces
    each child on its own, so only the untraceable modules' own direct Conv->BN pairs are
    missed. Inside a plain `nn.Sequential`, adjacent Conv->BN children are a pair whatever
    happens: its forward calls them in order.
    """
    try:
        pairs, order = _trace_pairs(model)
        return (
            [(_prefixed(prefix, c), _prefixed(prefix, b)) for c, b in pairs],
            [_prefixed(prefix, n) for n in order],
            [],
        )
    except Exception as err:  # torch.fx raises many kinds of errors on untraceable code
        pairs, order, untraced = [], [], [(prefix, err)]
    children = list(model.named_children())
    for name, child in children:
        if _is_float_layer(child):
            order.append(_prefixed(prefix, name))
        else:
            sub_pairs, sub_order, sub_untraced = _analyse(child, _prefixed(prefix, name))
            pairs += sub_pairs
            order += sub_order
            untraced += sub_untraced
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if _foldable(conv, bn):
                pairs.append((_prefixed(prefix, conv_name), _prefixed(prefix, bn_name)))
    return pairs, order, untraced


def _warn_unfolded(
    model: nn.Module, untraced: list[tuple[str, Exception]], pairs: list[tuple[str, str]]
) -> None:
    """Warn about BatchNorms left unfolded because the module calling them did not trace."""
    folded = {bn for _, bn in pairs}
    missed = []
    for name, err in untraced:
        module = model.get_submodule(name)
        bns = [
            _prefixed(name, n)
            for n, m in module.named_children()
            if isinstance(m, FOLDABLE_BN) and _prefixed(name, n) not in folded
        ]
        if bns:
            where = name or type(model).__name__
            missed.append(f"{where} ({type(err).__name__}: {err}) calls {', '.join(bns)}")
    if missed:
        warnings.warn(
            "prepare_qat: torch.fx could not trace " + "; ".join(missed) + ". These "
            "BatchNorms stay unfolded (float BatchNorm); pass "
            "fuse_pairs=[('conv_name', 'bn_name'), ...] to fold them.",
            UserWarning,
            stacklevel=4,  # the caller of prepare_qat / plan_qat / find_conv_bn_pairs
        )


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of the (conv, bn) pairs of ``model`` that can be folded.

    Traces ``model`` with torch.fx, which finds pairs whatever the forward looks like
    (attribute calls as in torchvision's resnet18, nested Sequentials); a pair is a BN
    whose only input is a conv whose only reader is that BN. Modules that do not trace are
    searched child by child (see `_analyse`), with a warning naming the BatchNorms missed.
    """
    pairs, _, untraced = _analyse(model)
    _warn_unfolded(model, untraced, pairs)
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


@dataclass
class ConversionPlan:
    """What `prepare_qat` will do: the layers to quantize, in call order, the (conv, bn)
    pairs to fold, and where the activations are quantized beyond each layer's own input
    (`lightning_qat.graph.Placement`: residual adds, concatenations, tensors several
    layers read)."""

    layers: list[str]
    pairs: list[tuple[str, str]]
    placement: Placement = field(default_factory=Placement)

    @property
    def folded(self) -> dict[str, str]:
        return dict(self.pairs)


def _place(model: nn.Module, layers: list[str]) -> Placement:
    """The placement of the activation quantizers, with a warning for what stays float.

    A module torch.fx cannot trace is skipped and its children placed one by one (as
    `_analyse` finds BN pairs): what flows between them in its own ``forward`` is not
    seen, and said so."""
    placement, untraced = Placement(), []

    def visit(module: nn.Module, prefix: str) -> None:
        try:
            traced = trace(module)
        except Exception as err:  # torch.fx raises many kinds of errors on untraceable code
            untraced.append(f"{prefix or type(model).__name__} ({type(err).__name__}: {err})")
            for name, child in module.named_children():
                visit(child, _prefixed(prefix, name))
            return
        start = f"{prefix}." if prefix else ""
        local = {n[len(start) :] for n in layers if n.startswith(start)}
        found = place(traced, local, prefix=prefix)
        placement.tensor_quantizers.extend(found.tensor_quantizers)
        placement.float_ops.extend(found.float_ops)
        placement.unquantized.extend(found.unquantized)

    visit(model, "")
    name = type(model).__name__
    if untraced:
        warnings.warn(
            "prepare_qat: torch.fx could not trace " + "; ".join(untraced) + ": their "
            "children were placed one by one, and residual adds or concatenations in their "
            "own forward (if any) run in float; exporting needs a model torch.fx can trace",
            UserWarning,
            stacklevel=4,
        )
    if placement.stays_float:
        warnings.warn(
            f"prepare_qat: in {name}, these ops stay float (no integer runtime runs them: "
            "deployment dequantizes before them and quantizes after, and the export refuses "
            "what it cannot express): " + "; ".join(placement.stays_float),
            UserWarning,
            stacklevel=4,
        )
    return placement


def plan_qat(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    fuse_pairs: Sequence[tuple[str, str]] | None = None,
) -> ConversionPlan:
    """The conversion `prepare_qat` would make, without changing ``model``.

    Raises:
        ValueError: nothing to quantize, or a ``fuse_pairs`` entry that is not a Conv2d
            and its BatchNorm2d.
    """
    config = config or QuantConfig()
    found_pairs, order, untraced = _analyse(model)
    modules = dict(model.named_modules())
    if not config.bn_fold:
        pairs = []
    elif fuse_pairs is not None:
        for conv_name, bn_name in fuse_pairs:
            if not _foldable(modules.get(conv_name), modules.get(bn_name)):
                raise ValueError(
                    f"fuse_pairs entry ({conv_name!r}, {bn_name!r}) is not a float Conv2d and "
                    "a BatchNorm2d (tracking running stats) with matching channels"
                )
        pairs = [tuple(pair) for pair in fuse_pairs]
    else:
        pairs = found_pairs
        _warn_unfolded(model, untraced, pairs)
    pairs = [(c, b) for c, b in pairs if not _excluded(c, config.exclude)]
    # Layers that exist but were never called in the trace still get converted, last.
    order += [n for n, m in modules.items() if _is_float_layer(m) and n not in order]
    order = [n for n in order if not _excluded(n, config.exclude)]
    if not order:
        raise ValueError(
            f"prepare_qat found nothing to quantize in {type(model).__name__}: no float "
            f"nn.Conv2d or nn.Linear outside exclude={list(config.exclude)}"
        )
    return ConversionPlan(layers=order, pairs=pairs, placement=_place(model, order))


def prepare_qat(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    fuse_pairs: Sequence[tuple[str, str]] | None = None,
) -> nn.Module:
    """Convert ``model`` in place to fake-quant layers and return it.

    - Conv2d followed by BatchNorm2d becomes `QuantConvBn2d` (BN folded) when
      ``config.bn_fold``, the BatchNorm replaced by a pass-through `FoldedBatchNorm2d`
      holding its Parameters and statistics under the same names; else `QuantConv2d` with
      the float BN kept. Other Conv2d become `QuantConv2d`, Linear becomes `QuantLinear`.
    - The new layers hold the very same Parameter objects, in the same order, so an
      optimizer built before conversion, its momentum and its LR scheduler carry on.
    - The model's ``forward`` is not touched: only submodules are swapped.
    - The first quantized layer (in call order) keeps a float input unless
      ``config.quantize_first_input``; its input range is still observed.

    Args:
        model: a float model (train or eval mode is kept).
        config: the scheme; ``QuantConfig()`` (W8A8 symmetric per-channel, folded) if None.
        fuse_pairs: (conv, bn) module names to fold, instead of finding them by tracing.

    Raises:
        ValueError: as `plan_qat`.
    """
    config = config or QuantConfig()
    return apply_plan(model, config, plan_qat(model, config, fuse_pairs=fuse_pairs))


def apply_plan(model: nn.Module, config: QuantConfig, plan: ConversionPlan) -> nn.Module:
    """Convert ``model`` in place as `plan_qat` planned it (see `prepare_qat`)."""
    bn_of = plan.folded
    modules = dict(model.named_modules())
    configs = layer_configs(config, plan.layers)
    for index, name in enumerate(plan.layers):
        layer, layer_config = modules[name], configs[name]
        quantize_input = index > 0 or config.quantize_first_input
        if name in bn_of:
            folded = FoldedBatchNorm2d(modules[bn_of[name]])
            _set_submodule(model, bn_of[name], folded)
            new = QuantConvBn2d.from_float(layer, folded, layer_config, quantize_input)
        elif isinstance(layer, nn.Conv2d):
            new = QuantConv2d.from_float(layer, layer_config, quantize_input)
        else:
            new = QuantLinear.from_float(layer, layer_config, quantize_input)
        for quantizer_name in ("activation_quantizer", "weight_quantizer"):
            getattr(new, quantizer_name).observer.name = f"{name}.{quantizer_name}"
        _set_submodule(model, name, new)
    _attach_tensor_quantizers(model, config, configs, plan.placement)
    return model


def layer_configs(config: QuantConfig, layers: Sequence[str]) -> dict[str, QuantConfig]:
    """Each layer's config, ``config.layer_bits`` applied (``layers`` in call order, so
    ``"@first"`` and ``"@last"`` name their first and last)."""
    last = len(layers) - 1
    return {
        name: config.for_layer(name, first=index == 0, last=index == last)
        for index, name in enumerate(layers)
    }


def _attach_tensor_quantizers(
    model: nn.Module, config: QuantConfig, configs: dict[str, QuantConfig], placement: Placement
) -> None:
    """Give each module of ``placement`` an ``output_quantizer`` applied by a forward hook
    (or an ``input_quantizer`` applied by a forward pre-hook; no ``forward`` changes),
    shared as ``activation_quantizer`` by the layers reading it. Its width is the widest
    of its reading layers' activation widths (one grid serves them all), the model-wide
    ``config.activation_bits`` where no layer reads it directly (an add's input)."""
    device = module_device(model)
    for point in placement.tensor_quantizers:
        module = model.get_submodule(point.module)
        readers = [configs[name] for name in point.layers if name in configs]
        widest = max(readers, key=lambda c: c.activation_bits) if readers else config
        quantizer = FakeQuantize.for_activations(widest).to(device)
        attribute = INPUT_QUANTIZER if point.on_input else OUTPUT_QUANTIZER
        quantizer.observer.name = f"{point.module}.{attribute}"
        module.add_module(attribute, quantizer)
        if point.on_input:
            module.register_forward_pre_hook(QuantizeInput())
        else:
            module.register_forward_hook(QuantizeOutput())
        for name in point.layers:
            layer = model.get_submodule(name)
            layer.activation_quantizer = quantizer
            layer.input_quantized_upstream = True


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    """``(name, quantizer)`` for every `FakeQuantize` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            yield name, module


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned step sizes and zero points of ``model`` (`QuantConfig.learn_scale`),
    each once, in module order: what the QAT callback puts in its own optimizer group."""
    return [
        parameter
        for _, quantizer in quantizers(model)
        for parameter in quantizer.parameters(recurse=False)
    ]


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    """``(name, quantizer)`` for every activation quantizer in ``model``, each once: the
    layers' own input quantizers and the standalone ones (residual adds, shared inputs)."""
    weights = {id(layer.weight_quantizer) for _, layer in quantized_layers(model)}
    for name, quantizer in quantizers(model):
        if id(quantizer) not in weights:
            yield name, quantizer


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every quantized layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LAYERS):
            yield name, module
