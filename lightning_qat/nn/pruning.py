"""Pruned tensors (``torch.nn.utils.prune``, Lightning's ``ModelPruning``) carried through
the conversion to quantized layers.

torch's pruning turns a module's Parameter ``weight`` into a Parameter ``weight_orig``, a
buffer ``weight_mask`` and a forward pre-hook that sets the plain tensor
``weight = weight_orig * weight_mask`` before every call. A quantized layer adopts all
three, so it trains the same Parameter through the same mask, and quantizes the pruned
weight: a pruned weight is 0, on every grid (symmetric: code 0; asymmetric: the zero
point, which represents 0 exactly), so the deployed model keeps the sparsity.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune


def _pruning_hooks(module: nn.Module, name: str | None = None) -> list[prune.BasePruningMethod]:
    return [
        hook
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod) and (name is None or hook._tensor_name == name)
    ]


def adopt_tensor(new: nn.Module, old: nn.Module, name: str) -> None:
    """``new.<name>`` becomes ``old.<name>``: the very same Parameter, or, where ``old``
    is pruned, its ``<name>_orig`` Parameter, ``<name>_mask`` buffer and pruning hook."""
    hooks = _pruning_hooks(old, name)
    if not hooks:
        setattr(new, name, getattr(old, name))
        return
    new._parameters.pop(name, None)
    new.register_parameter(f"{name}_orig", getattr(old, f"{name}_orig"))
    new.register_buffer(f"{name}_mask", getattr(old, f"{name}_mask"))
    setattr(new, name, getattr(old, name))  # the plain masked tensor, until the next call
    for hook in hooks:
        new.register_forward_pre_hook(hook)


def apply_pruning(module: nn.Module) -> None:
    """Recompute every pruned tensor of ``module`` (and its children) from its current
    ``_orig`` Parameter and mask, as torch's pruning hooks do before a call. For code that
    reads a layer's weight without calling it (export, the BN folded into a conv)."""
    for child in module.modules():
        for hook in _pruning_hooks(child):
            hook(child, ())
