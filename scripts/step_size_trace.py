"""Trace how learned weight step sizes (LSQ, ``QuantConfig.learn_scale``) move, one line a
training step: a diagnostic for step sizes that run away (issue 12, LSQ at W8A8).

Add it to any run of the app, for a few steps::

    PYTHONPATH=scripts python train.py recipe=resnet20_lowbit_cpu quant=w8a8_lsq \\
        init_checkpoint=CKPT +callbacks.trace._target_=step_size_trace.StepSizeTrace \\
        trainer.max_steps=60 trainer.limit_val_batches=0 deploy=null

Per step, over every weight channel whose step size is learned: the largest and the median
relative change of the step size in that optimizer step (``|s' - s| / s``), the median
relative change of the weights (``||w' - w|| / ||w||`` per layer) for comparison, how many
step sizes are now more than 10x off (above or below) the value they started learning
from, and how many channels quantize to all zeros (dead). The lines also go to
``step_size_trace.csv`` in the working directory.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch

from lightning_qat.callback import _weights_as_quantized  # the callback's own measure
from lightning_qat.quant.learned_fake_quantize import LearnedScaleFakeQuantize
from lightning_qat.quant.metrics import zeroed_channels

FIELDS = (
    "step",
    "max_rel_step_change",
    "median_rel_step_change",
    "median_rel_weight_change",
    "steps_10x_off",
    "dead_channels",
    "channels",
    "largest_change_layer",
    "largest_change_step_over_layer_median",
)


class StepSizeTrace(L.Callback):
    """Prints (and writes) the step-size statistics of every training step."""

    def __init__(self, path: str = "step_size_trace.csv"):
        self.path = Path(path)
        self.initial: dict[str, torch.Tensor] = {}
        self.before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: list[dict[str, float]] = []

    def _layers(self, pl_module: L.LightningModule):
        for name, module in pl_module.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if isinstance(quantizer, LearnedScaleFakeQuantize) and quantizer.learning:
                yield name, module, quantizer

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before = {
            name: (quantizer.scale.detach().clone(), module.weight.detach().clone())
            for name, module, quantizer in self._layers(pl_module)
        }
        for name, (scale, _) in self.before.items():
            self.initial.setdefault(name, scale)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_changes, weight_changes, off, dead, channels = [], [], 0, 0, 0
        largest = (-1.0, "", 0.0)  # (relative change, layer, its step / the layer's median step)
        for name, module, quantizer in self._layers(pl_module):
            if name not in self.before:
                continue
            scale_before, weight_before = self.before[name]
            scale = quantizer.scale.detach().clamp(min=1e-12)
            change = ((scale - scale_before).abs() / scale_before).flatten()
            step_changes.append(change)
            if float(change.max()) > largest[0]:
                channel = int(change.argmax())
                relative = float(scale_before.flatten()[channel] / scale_before.median())
                largest = (float(change.max()), name, relative)
            weight_changes.append(
                float((module.weight - weight_before).norm() / weight_before.norm())
            )
            ratio = scale / self.initial[name]
            off += int(((ratio > 10) | (ratio < 0.1)).sum())
            dead += len(zeroed_channels(*_weights_as_quantized(module), quantizer.ch_axis))
            channels += scale.numel()
        if not step_changes:
            return
        changes = torch.cat(step_changes)
        row = {
            "step": trainer.global_step,
            "max_rel_step_change": float(changes.max()),
            "median_rel_step_change": float(changes.median()),
            "median_rel_weight_change": float(torch.tensor(weight_changes).median()),
            "steps_10x_off": off,
            "dead_channels": dead,
            "channels": channels,
            "largest_change_layer": largest[1],
            "largest_change_step_over_layer_median": largest[2],
        }
        self.rows.append(row)
        print(
            f"step {row['step']:4d}  step size change max {row['max_rel_step_change']:8.3g}"
            f" median {row['median_rel_step_change']:8.3g}  weight change median"
            f" {row['median_rel_weight_change']:8.3g}  10x off {off:4d}  dead {dead:4d}/{channels}"
            f"  largest in {largest[1]} (step {largest[2]:.3g}x its layer's median)",
            flush=True,
        )
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
