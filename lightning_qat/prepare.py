"""`prepare_qat`: convert a float model to fake-quant layers, in place."""

from __future__ import annotations

import fnmatch
import itertools
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lightning_qat.float_modules import FloatModule, float_modules
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
    FOLDED_FORM,
    QUANTIZED_FORM,
    QUANTIZED_LAYERS,
    FoldedBatchNorm2d,
    QuantMultiheadAttention,
    ReLUBeforeQuantizer,
    attention_unsupported,
    keep_module_paths,
)
from lightning_qat.quant import FakeQuantize, QuantConfig
from lightning_qat.quant.config import FIRST_LAYER, LAST_LAYER

#: The BatchNorms folded into each kind of convolution: SyncBatchNorm too (Lightning's
#: sync_batchnorm=True converts BatchNorms to it before training starts).
FOLDING = {
    nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.Conv1d: (nn.BatchNorm1d, nn.SyncBatchNorm),
}
FOLDABLE_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def quantized_form(module: nn.Module) -> type[nn.Module] | None:
    """The quantized layer class that replaces the float ``module``, or ``None`` (not a
    layer lightning-qat quantizes, already quantized, or an attention it cannot)."""
    if isinstance(module, QUANTIZED_LAYERS):
        return None
    if isinstance(module, nn.MultiheadAttention) and attention_unsupported(module):
        return None
    return next((q for f, q in QUANTIZED_FORM.items() if isinstance(module, f)), None)


def _is_float_layer(module: nn.Module) -> bool:
    return quantized_form(module) is not None


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    norms = next((b for c, b in FOLDING.items() if isinstance(conv, c)), ())
    return (
        type(bn) in norms  # not subclasses, whose forward may differ
        and bn.track_running_stats
        and _is_float_layer(conv)
        and bn.num_features == conv.out_channels
    )


@dataclass
class _Analysis:
    """What tracing finds: the foldable (conv, bn) pairs, the order of the layer calls,
    the modules that did not trace (with the error), and the attentions called as
    ``mha(x, x, x)``."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    untraced: list[tuple[str, Exception]] = field(default_factory=list)
    self_attention: set[str] = field(default_factory=set)

    def extend(self, other: _Analysis) -> None:
        self.pairs += other.pairs
        self.order += other.order
        self.untraced += other.untraced
        self.self_attention |= other.self_attention


def _holds_layers(module: nn.Module) -> bool:
    """Whether a module that is not itself a layer holds float layers to quantize (an
    attention left float does not: it reads its ``out_proj``'s weight, never calls it)."""
    return not isinstance(module, (nn.MultiheadAttention, *QUANTIZED_LAYERS)) and any(
        _is_float_layer(m) for m in module.modules()
    )


def _trace(model: nn.Module, prefix: str) -> _Analysis:
    """`_Analysis` of ``model`` from a torch.fx trace (raises where it does not trace).

    A pair is folded only when the BN's input is the conv's output and nothing else reads
    that output, and each module is called once (a reused module cannot be folded). A
    module torch.fx keeps whole that holds layers (torch's ``TransformerEncoder``) is
    analysed on its own, its layers in the order at its call.
    """
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module"]
    times_called = Counter(n.target for n in calls)
    found = _Analysis()
    for node in calls:
        name = _prefixed(prefix, node.target)
        module = modules[node.target]
        if _is_float_layer(module) and name not in found.order:
            found.order.append(name)
        elif _holds_layers(module) and times_called[node.target] == 1:
            found.extend(_analyse(module, name))
        if isinstance(module, nn.MultiheadAttention):
            inputs = [*node.args, *node.kwargs.values()][:3]
            if len(inputs) == 3 and inputs[0] is inputs[1] is inputs[2]:
                found.self_attention.add(name)
        if not isinstance(module, FOLDABLE_BN) or not node.args:
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and len(src.users) == 1
            and times_called[src.target] == 1
            and times_called[node.target] == 1
            and _foldable(modules[src.target], module)
        ):
            found.pairs.append((_prefixed(prefix, src.target), name))
    return found


def _prefixed(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


#: Where torch's own transformer layers call their attentions: (layer, attribute) ->
#: called as self-attention.
_TRANSFORMER_ATTENTIONS = {
    (nn.TransformerEncoderLayer, "self_attn"): True,
    (nn.TransformerDecoderLayer, "self_attn"): True,
    (nn.TransformerDecoderLayer, "multihead_attn"): False,
}


def _analyse(model: nn.Module, prefix: str = "") -> _Analysis:
    """Foldable pairs, layer call order, the modules that did not trace, self-attentions.

    Traces ``model`` whole; where that fails (data-dependent control flow, say), traces
    each child on its own, so only the untraceable modules' own direct Conv->BN pairs are
    missed. Inside a plain `nn.Sequential`, adjacent Conv->BN children are a pair whatever
    happens: its forward calls them in order. torch's transformer layers do not trace
    (their fused fast path branches on the input); how they call their attentions is
    known.
    """
    try:
        return _trace(model, prefix)
    except Exception as err:  # torch.fx raises many kinds of errors on untraceable code
        found = _Analysis(untraced=[(prefix, err)])
    children = list(model.named_children())
    for name, child in children:
        if _is_float_layer(child):
            found.order.append(_prefixed(prefix, name))
            if _TRANSFORMER_ATTENTIONS.get((type(model), name)):
                found.self_attention.add(_prefixed(prefix, name))
        elif not isinstance(child, nn.MultiheadAttention):  # it reads out_proj's weight
            found.extend(_analyse(child, _prefixed(prefix, name)))
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if _foldable(conv, bn):
                found.pairs.append((_prefixed(prefix, conv_name), _prefixed(prefix, bn_name)))
    return found


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
    found = _analyse(model)
    _warn_unfolded(model, found.untraced, found.pairs)
    return found.pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


@dataclass
class ConversionPlan:
    """What `prepare_qat` will do: the layers to quantize, in call order, the (conv, bn)
    pairs to fold, where the activations are quantized beyond each layer's own input
    (`lightning_qat.graph.Placement`: residual adds, concatenations, tensors several
    layers read), the modules holding weights that stay float (and why), and the
    attentions called as self-attention (one input quantizer)."""

    layers: list[str]
    pairs: list[tuple[str, str]]
    placement: Placement = field(default_factory=Placement)
    left_float: list[FloatModule] = field(default_factory=list)
    self_attention: set[str] = field(default_factory=set)

    @property
    def folded(self) -> dict[str, str]:
        return dict(self.pairs)


#: torch modules that torch.fx cannot trace and whose forward is known: containers, and
#: the transformer layers, whose residual adds feed a LayerNorm (a float island), so
#: nothing between their children is to quantize.
KNOWN_UNTRACEABLE = (
    nn.ModuleList,
    nn.ModuleDict,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _place(model: nn.Module, layers: list[str]) -> Placement:
    """The placement of the activation quantizers, with a warning for what stays float.

    A module torch.fx cannot trace is skipped and its children placed one by one (as
    `_analyse` finds BN pairs): what flows between them in its own ``forward`` is not
    seen, and said so."""
    placement, untraced = Placement(), []

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.MultiheadAttention):
            return  # quantized as a whole (QuantMultiheadAttention), or float and named
        try:
            traced = trace(module)
        except Exception as err:  # torch.fx raises many kinds of errors on untraceable code
            if not isinstance(module, KNOWN_UNTRACEABLE):
                where = prefix or type(model).__name__
                untraced.append(f"{where} ({type(err).__name__}: {err})")
            for name, child in module.named_children():
                visit(child, _prefixed(prefix, name))
            return
        start = f"{prefix}." if prefix else ""
        local = {n[len(start) :] for n in layers if n.startswith(start)}
        found = place(traced, local, prefix=prefix)
        placement.tensor_quantizers.extend(found.tensor_quantizers)
        placement.float_ops.extend(found.float_ops)
        placement.unquantized.extend(found.unquantized)
        placement.relus_into_layers.extend(found.relus_into_layers)
        for name in found.opaque:  # modules torch.fx kept whole that hold layers
            visit(module.get_submodule(name), _prefixed(prefix, name))

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
        ValueError: nothing to quantize, a ``fuse_pairs`` entry that is not a
            convolution and its BatchNorm, or (``config.strict``) modules holding weights
            that would stay float.
    """
    config = config or QuantConfig()
    found = _analyse(model)
    order = found.order
    modules = dict(model.named_modules())
    if not config.bn_fold:
        pairs = []
    elif fuse_pairs is not None:
        for conv_name, bn_name in fuse_pairs:
            if not _foldable(modules.get(conv_name), modules.get(bn_name)):
                raise ValueError(
                    f"fuse_pairs entry ({conv_name!r}, {bn_name!r}) is not a float Conv2d "
                    "(Conv1d) and a BatchNorm2d (BatchNorm1d) tracking running stats, with "
                    "matching channels"
                )
        pairs = [tuple(pair) for pair in fuse_pairs]
    else:
        pairs = found.pairs
        _warn_unfolded(model, found.untraced, pairs)
    pairs = [(c, b) for c, b in pairs if not _excluded(c, config.exclude)]
    # Layers that exist but were never called in the trace still get converted, last
    # (not an attention's output projection: the attention converts it).
    attentions = {n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    order += [
        n
        for n, m in modules.items()
        if _is_float_layer(m) and n not in order and n.rpartition(".")[0] not in attentions
    ]
    _check_exclude(model, config.exclude, list(modules))
    order = [n for n in order if not _excluded(n, config.exclude)]
    if not order:
        raise ValueError(
            f"prepare_qat found nothing to quantize in {type(model).__name__}: no float "
            f"Conv1d/Conv2d/ConvTranspose2d, Linear or MultiheadAttention outside "
            f"exclude={list(config.exclude)}"
        )
    _check_layer_bits(model, config, order)
    # BatchNorms found foldable are folded now or, with bn_fold=False, at export
    folded_bns = [b for _, b in found.pairs]
    left_float = float_modules(model, order, folded_bns, config.exclude)
    _report_float(model, left_float, config.strict)
    return ConversionPlan(
        layers=order,
        pairs=pairs,
        placement=_place(model, order),
        left_float=left_float,
        self_attention=found.self_attention,
    )


def _unmatched(patterns: Iterable[str], names: Sequence[str]) -> list[str]:
    """The ``fnmatch`` patterns of ``patterns`` that match none of ``names``."""
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def _check_exclude(model: nn.Module, patterns: Sequence[str], names: Sequence[str]) -> None:
    """Refuse an ``exclude`` pattern naming none of the module ``names`` of ``model``: a
    misspelt name would leave the layer it meant quantized, silently."""
    unmatched = _unmatched(patterns, names)
    if unmatched:
        raise ValueError(
            f"QuantConfig.exclude has {_patterns(unmatched)} matching no module of "
            f"{type(model).__name__}; its modules: {_some(n for n in names if n)}"
        )


def _check_layer_bits(model: nn.Module, config: QuantConfig, layers: Sequence[str]) -> None:
    """Refuse a ``layer_bits`` pattern matching none of the layers to quantize (in
    ``layers``, the excluded ones left out): a misspelt name would leave the layer it meant
    at the model-wide width, silently (at 2-4 bits the first layer's width alone moves
    accuracy by points)."""
    named = [p for p in config.layer_bits if p not in (FIRST_LAYER, LAST_LAYER)]
    unmatched = _unmatched(named, layers)
    if unmatched:
        raise ValueError(
            f"QuantConfig.layer_bits has {_patterns(unmatched)} matching none of the layers "
            f"of {type(model).__name__} to quantize (fnmatch patterns on module names, or "
            f"{FIRST_LAYER!r} / {LAST_LAYER!r}); its layers: {_some(layers)}"
        )


def _patterns(patterns: Sequence[str]) -> str:
    return ("the pattern " if len(patterns) == 1 else "the patterns ") + ", ".join(
        repr(p) for p in patterns
    )


def _some(names: Iterable[str], shown: int = 12) -> str:
    """The first ``shown`` of ``names``, and how many more."""
    names = list(names)
    more = f" ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _report_float(model: nn.Module, left_float: list[FloatModule], strict: bool) -> None:
    """Warn about the modules holding weights that stay float; with ``strict``, refuse
    those that are float not by design."""
    name = type(model).__name__
    refused = [f for f in left_float if not f.by_design]
    if strict and refused:
        raise ValueError(
            "prepare_qat(strict): these modules hold weights that would stay float: "
            + "; ".join(f.describe(name) for f in refused)
            + ". Quantize them another way, or list them in QuantConfig.exclude to "
            "keep them float knowingly."
        )
    if left_float:
        warnings.warn(
            "prepare_qat: these modules hold weights and stay float: "
            + "; ".join(f.describe(name) for f in left_float),
            UserWarning,
            stacklevel=4,
        )


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
      the float BN kept. Other Conv2d become `QuantConv2d`, Linear becomes `QuantLinear`;
      Conv1d (+ BatchNorm1d) and ConvTranspose2d likewise (`QuantConv1d`,
      `QuantConvBn1d`, `QuantConvTranspose2d`).
    - `nn.MultiheadAttention` (so torch's transformer layers) becomes
      `QuantMultiheadAttention`: projections and both attention matmuls on quantized
      operands; the fused fast path of ``TransformerEncoderLayer`` is turned off
      (`lightning_qat.nn.KeepModulePath`) so that eval computes what training simulated.
    - Every module holding weights that stays float (LayerNorm, an LSTM, a Parameter the
      model adds itself, what ``config.exclude`` names) is listed in a warning, and in
      `ConversionPlan.left_float`; ``config.strict`` refuses those float not by design.
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
            form = next(q for f, q in FOLDED_FORM.items() if isinstance(layer, f))
            new = form.from_float(layer, folded, layer_config, quantize_input)
        elif isinstance(layer, nn.MultiheadAttention):
            self_attention = name in plan.self_attention
            new = QuantMultiheadAttention.from_float(
                layer, layer_config, quantize_input, self_attention
            )
        else:
            new = quantized_form(layer).from_float(layer, layer_config, quantize_input)
        for quantizer_name, quantizer in new.named_modules():
            if isinstance(quantizer, FakeQuantize):
                quantizer.observer.name = f"{name}.{quantizer_name}"
        _set_submodule(model, name, new)
    keep_module_paths(model)
    _attach_tensor_quantizers(model, config, configs, plan.placement)
    _join_relus_to_quantizers(model, plan.placement)
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
    ``config.activation_bits`` where no layer reads it directly (an add's input); on the
    residual path (an op other than a layer reads it) ``config.residual_bits`` where set,
    and the layers reading it at another width keep their own input quantizer, which
    requantizes the value onto their grid."""
    device = module_device(model)
    for point in placement.tensor_quantizers:
        module = model.get_submodule(point.module)
        readers = [configs[name] for name in point.layers if name in configs]
        residual = config.residual_bits is not None and len(point.readers) > len(point.layers)
        if residual:
            grid_config = replace(config, activation_bits=config.residual_bits, layer_bits={})
        else:
            grid_config = max(readers, key=lambda c: c.activation_bits) if readers else config
        quantizer = FakeQuantize.for_activations(grid_config).to(device)
        attribute = INPUT_QUANTIZER if point.on_input else OUTPUT_QUANTIZER
        quantizer.observer.name = f"{point.module}.{attribute}"
        module.add_module(attribute, quantizer)
        if point.on_input:
            module.register_forward_pre_hook(QuantizeInput())
        else:
            module.register_forward_hook(QuantizeOutput())
        for name in point.layers:
            layer = model.get_submodule(name)
            if residual and configs[name].activation_bits != grid_config.activation_bits:
                continue  # its own quantizer requantizes onto its width
            layer.activation_quantizer = quantizer
            layer.input_quantized_upstream = True


def _join_relus_to_quantizers(model: nn.Module, placement: Placement) -> None:
    """Make each ``nn.ReLU`` whose output goes to one per-tensor `FakeQuantize` and
    nothing else a `ReLUBeforeQuantizer`, its gradient mask applied by that quantizer:
    a ReLU that only its layer's input quantizer reads, or a ReLU returning its output
    through its own ``output_quantizer``. A learned-step quantizer (which keeps its
    input for the step's gradient anyway) zeroes its input's gradient where the ReLU
    did, in place: one activation-sized tensor less in the backward."""
    joins: list[tuple[nn.Module, FakeQuantize]] = []
    for relu_name, layer_name in placement.relus_into_layers:
        layer = model.get_submodule(layer_name)
        if not layer.input_quantized_upstream and layer.activation_quantizer.fake_quant_enabled:
            joins.append((model.get_submodule(relu_name), layer.activation_quantizer))
    for point in placement.tensor_quantizers:
        module = model.get_submodule(point.module)
        if not point.on_input and type(module) is nn.ReLU:
            joins.append((module, getattr(module, OUTPUT_QUANTIZER)))
    for relu, quantizer in joins:
        if type(relu) is nn.ReLU and ReLUBeforeQuantizer.can_read(quantizer):
            ReLUBeforeQuantizer.convert(relu, quantizer)


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
