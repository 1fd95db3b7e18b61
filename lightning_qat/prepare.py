"""`prepare_qat`: convert a float model to fake-quant layers, in place."""

from __future__ import annotations

import fnmatch
import itertools
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch import nn

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


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Conv->BN pairs adjacent in an `nn.Sequential` whose forward is Sequential's own."""
    pairs = []
    for prefix, module in model.named_modules():
        if (
            not isinstance(module, nn.Sequential)
            or type(module).forward is not nn.Sequential.forward
        ):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if _foldable(conv, bn):
                dot = f"{prefix}." if prefix else ""
                pairs.append((dot + conv_name, dot + bn_name))
    return pairs


def _analyse(model: nn.Module) -> tuple[list[tuple[str, str]], list[str], Exception | None]:
    """Foldable pairs, conv/linear call order and the trace error (None if it traced)."""
    try:
        pairs, order = _trace_pairs(model)
        return pairs, order, None
    except Exception as err:  # torch.fx raises many kinds of errors on untraceable code
        order = [n for n, m in model.named_modules() if _is_float_layer(m)]
        return _sequential_pairs(model), order, err


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of the (conv, bn) pairs of ``model`` that can be folded.

    Traces ``model`` with torch.fx, which finds pairs whatever the forward looks like
    (attribute calls as in torchvision's resnet18, nested Sequentials). When the model does
    not trace (data-dependent control flow), warns and falls back to pairs adjacent inside
    plain `nn.Sequential` containers, the one place where the call order is known.
    """
    pairs, _, err = _analyse(model)
    if err is not None:
        _warn_untraceable(model, err, pairs)
    return pairs


def _warn_untraceable(model: nn.Module, err: Exception, pairs: list) -> None:
    warnings.warn(
        f"prepare_qat: {type(model).__name__} does not trace with torch.fx "
        f"({type(err).__name__}: {err}); folding BatchNorm only inside nn.Sequential "
        f"({len(pairs)} pair(s)). Other Conv->BN pairs stay unfolded (float BatchNorm); "
        "pass fuse_pairs=[('conv_name', 'bn_name'), ...] to fold them.",
        UserWarning,
        stacklevel=4,
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


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
        ValueError: nothing to quantize, or a ``fuse_pairs`` entry that is not a Conv2d
            and its BatchNorm2d.
    """
    config = config or QuantConfig()
    found_pairs, order, trace_error = _analyse(model)
    if not config.bn_fold:
        pairs = []
    elif fuse_pairs is not None:
        modules = dict(model.named_modules())
        for conv_name, bn_name in fuse_pairs:
            if not _foldable(modules.get(conv_name), modules.get(bn_name)):
                raise ValueError(
                    f"fuse_pairs entry ({conv_name!r}, {bn_name!r}) is not a float Conv2d and "
                    "a BatchNorm2d (tracking running stats) with matching channels"
                )
        pairs = list(fuse_pairs)
    else:
        pairs = found_pairs
        if trace_error is not None:
            _warn_untraceable(model, trace_error, pairs)
    pairs = [(c, b) for c, b in pairs if not _excluded(c, config.exclude)]
    bn_of = dict(pairs)

    # Layers that exist but were never called in the trace still get converted, last.
    order += [n for n, m in model.named_modules() if _is_float_layer(m) and n not in order]
    order = [n for n in order if not _excluded(n, config.exclude)]
    if not order:
        raise ValueError(
            f"prepare_qat found nothing to quantize in {type(model).__name__}: no float "
            f"nn.Conv2d or nn.Linear outside exclude={list(config.exclude)}"
        )

    modules = dict(model.named_modules())
    for index, name in enumerate(order):
        layer = modules[name]
        quantize_input = index > 0 or config.quantize_first_input
        if name in bn_of:
            folded = FoldedBatchNorm2d(modules[bn_of[name]])
            _set_submodule(model, bn_of[name], folded)
            new = QuantConvBn2d.from_float(layer, folded, config, quantize_input)
        elif isinstance(layer, nn.Conv2d):
            new = QuantConv2d.from_float(layer, config, quantize_input)
        else:
            new = QuantLinear.from_float(layer, config, quantize_input)
        for quantizer_name in ("activation_quantizer", "weight_quantizer"):
            getattr(new, quantizer_name).observer.name = f"{name}.{quantizer_name}"
        _set_submodule(model, name, new)
    return model


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    """``(name, quantizer)`` for every `FakeQuantize` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            yield name, module


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every quantized layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LAYERS):
            yield name, module
