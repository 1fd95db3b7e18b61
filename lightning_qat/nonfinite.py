"""Finding NaN and Inf in a training step before they reach the weights.

Fake quantization hides a non-finite value: the kernels map NaN to a finite code, so one
NaN pixel turns a layer's batch statistics and then its weights to NaN while the loss
stays finite and training goes on. These helpers check what a training step changes
(the loss, the gradients, the BatchNorm statistics) in one device-side flag, and name the
first layer at fault when the flag is set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_qat.quant import FakeQuantize, MovingAverageMinMaxObserver


class NonFiniteError(RuntimeError):
    """A training step produced NaN or Inf in the loss, a gradient or a BN statistic."""


def _state_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The floating buffers that training updates (BN running statistics), not the
    quantizers': an observer's range is +-inf until it has seen data, by design."""
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, FakeQuantize | MovingAverageMinMaxObserver):
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                found.append((f"{module_name}.{name}" if module_name else name, buffer))
    return found


def step_is_finite(
    model: nn.Module, loss: torch.Tensor | None = None, check_grads: bool = True
) -> torch.Tensor:
    """A 0-d bool tensor on the model's device: True when the loss, every gradient (if
    ``check_grads``) and every BN statistic is finite. Nothing is read on the host."""
    flags = []
    if loss is not None:
        flags.append(torch.isfinite(loss.detach()).all())
    if check_grads:
        flags.extend(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    flags.extend(torch.isfinite(b).all() for _, b in _state_buffers(model))
    if not flags:
        return torch.ones((), dtype=torch.bool)
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).all()


def describe_nonfinite(
    model: nn.Module, loss: torch.Tensor | None = None, inputs: Any = None
) -> str:
    """What is non-finite, in words: the loss, the first layer (in module order) whose
    weights, gradients or BN statistics hold NaN/Inf, and the input's non-finite count."""
    parts = []
    if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
        parts.append(f"loss = {loss.detach().float().mean().item()}")
    for module_name, module in model.named_modules():
        if isinstance(module, FakeQuantize | MovingAverageMinMaxObserver):
            continue
        bad = [
            name
            for name, p in module.named_parameters(recurse=False)
            if not bool(torch.isfinite(p).all())
        ]
        bad += [
            f"{name}.grad"
            for name, p in module.named_parameters(recurse=False)
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        bad += [
            name
            for name, b in module.named_buffers(recurse=False)
            if b is not None and b.is_floating_point() and not bool(torch.isfinite(b).all())
        ]
        if bad:
            parts.append(f"first layer at fault: {module_name or '<model>'} ({', '.join(bad)})")
            break
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        count = int((~torch.isfinite(inputs)).sum())
        if count:
            parts.append(f"the batch's input holds {count} NaN/Inf value(s)")
    return "; ".join(parts) or "no non-finite value found"


def snapshot_state(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every buffer (BN statistics, observer ranges, scales), to undo a step."""
    return [(b, b.detach().clone()) for b in model.buffers()]


def restore_state(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, saved in snapshot:
            buffer.copy_(saved)
