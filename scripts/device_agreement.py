"""Where a QAT model's training step on another device (a GPU) parts from the CPU's.

End to end, two devices never agree on a quantized network: float reordering (cuDNN
against the CPU's convolutions, a kernel's ``x * (1/s)`` against ``x / s``) moves a
value across a rounding boundary now and then, its code flips by one step, and every
later layer computes from a different input. At 4 bits one flipped activation code in
the first block changed 80% of a ResNet-8's later outputs (H200 against the CPU,
README "On a GPU"). So this compares module by module: every module of a copy on the
device is fed the very inputs the CPU copy's module got (requiring gradients where
they did, so the training path runs), and its output is compared with the CPU's. A
wrong kernel shows up in the module that runs it; a flipped code only where it flips.

``python scripts/device_agreement.py [cuda]``: ResNet-8 (random 8x8 inputs, one
training step) in four configurations; prints, per configuration, the modules that
differ when fed the CPU's inputs, the first modules where the free-running step
parts, and the largest relative differences of the parameters' gradients (free
running, so code flips included).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Key = tuple[str, int]  # a module's name and which of its calls


def _recorded(value: Any) -> Any:
    """A module's argument as recorded: a float tensor detached with whether it required
    gradients; a Parameter as None (each copy passes its own); anything else itself."""
    if isinstance(value, nn.Parameter):
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone(), value.requires_grad and value.is_floating_point()
    return value


def module_outputs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: str | torch.device,
    inputs: dict[Key, tuple] | None = None,
) -> tuple[dict[Key, tuple[tuple, torch.Tensor | None]], torch.Tensor, dict[str, torch.Tensor]]:
    """One training step of ``model`` (already on ``device``), cross-entropy on ``(x, y)``:
    every submodule call's recorded arguments and output (on the CPU), the model's
    output, and the parameters' gradients.

    With ``inputs`` (the first value of another run's result), each submodule is fed the
    arguments recorded there instead of what its predecessors computed (a fresh
    non-leaf copy: in-place ops stay legal), so its output depends on its own
    computation alone."""
    calls: dict[Key, tuple[tuple, torch.Tensor | None]] = {}
    counts: dict[str, int] = {}
    hooks = []

    def before(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if inputs is None:
                return None
            recorded = inputs[(name, counts.get(name, 0))][0]
            return tuple(
                r[0].to(device).requires_grad_(r[1]).clone() if isinstance(r, tuple) else a
                for r, a in zip(recorded, args, strict=True)
            )

        return hook

    def after(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            key = (name, counts.get(name, 0))
            counts[name] = key[1] + 1
            output = out.detach().cpu().clone() if isinstance(out, torch.Tensor) else None
            calls[key] = (tuple(_recorded(a) for a in args), output)

        return hook

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(before(name)))
            hooks.append(module.register_forward_hook(after(name)))
    try:
        out = model(x.to(device))
        nn.functional.cross_entropy(out, y.to(device)).backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {
        n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    return calls, out.detach().cpu(), grads


@dataclasses.dataclass
class Difference:
    """How one module call's output differs: the largest difference over the CPU
    output's largest magnitude, and the fraction of elements off by more than
    ``1e-5`` of that magnitude (float reordering stays far below it; a flipped code is
    a whole step)."""

    key: Key
    relative: float
    fraction: float


def differences(
    reference: dict[Key, tuple], other: dict[Key, tuple], threshold: float = 1e-5
) -> list[Difference]:
    """Module calls, in call order, whose outputs in ``other`` differ from ``reference``'s
    beyond ``threshold`` relative to the reference's largest magnitude."""
    found = []
    for key, (_, expected) in reference.items():
        got = other.get(key, (None, None))[1]
        if expected is None or got is None or expected.numel() == 0:
            continue
        scale = float(expected.abs().max()) + 1e-12
        gap = (got - expected).abs()
        relative = float(gap.max()) / scale
        if relative > threshold:
            found.append(Difference(key, relative, float((gap > threshold * scale).float().mean())))
    return found


def compare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> dict[str, Any]:
    """The CPU against ``device`` for one training step of (copies of) ``model``:
    ``fed`` (modules fed the CPU's inputs that differ), ``free`` (where the free-running
    step parts), ``grads`` (relative difference of each parameter's gradient, free
    running) and the outputs' largest difference ``output``."""
    cpu_calls, cpu_out, cpu_grads = module_outputs(copy.deepcopy(model), x, y, "cpu")
    fed, _, _ = module_outputs(copy.deepcopy(model).to(device), x, y, device, inputs=cpu_calls)
    free, out, grads = module_outputs(copy.deepcopy(model).to(device), x, y, device)
    return {
        "fed": differences(cpu_calls, fed),
        "free": differences(cpu_calls, free),
        "grads": {
            n: float((grads[n] - g).norm()) / (float(g.norm()) + 1e-12)
            for n, g in cpu_grads.items()
        },
        "output": float((out - cpu_out).abs().max()),
    }


def main(device: str) -> None:
    sys.path.insert(0, "tests")
    from test_learned_scale import LSQ_W4A4

    from lightning_qat import QuantConfig, prepare_qat
    from lightning_qat.app.models import ResNetCifar

    configs = {
        "w8a8": QuantConfig(),
        "w8a8-asym-unfolded": QuantConfig(symmetric=False, bn_fold=False),
        "lsq-w4a4": LSQ_W4A4,
        "lsq-w4a4-weight-units": dataclasses.replace(LSQ_W4A4, folded_step_units="weight"),
    }
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for name, config in configs.items():
        torch.manual_seed(0)
        model = prepare_qat(ResNetCifar(depth=8, in_channels=1), config).train()
        x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
        model(x)  # observes, and starts the learned steps, on the CPU
        result = compare(model, x, y, device)
        print(f"== {name}: outputs' largest difference {result['output']:.3g}")
        shown = (("fed the CPU's inputs", result["fed"]), ("free running", result["free"][:6]))
        for label, found in shown:
            for d in found:
                print(f"  {label}: {d.key[0]}#{d.key[1]} {d.relative:.3g} on {d.fraction:.3g}")
        worst = sorted(result["grads"].items(), key=lambda item: -item[1])[:6]
        print("  gradients, largest relative differences:", [(n, f"{v:.3g}") for n, v in worst])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
