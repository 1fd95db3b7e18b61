"""BatchNorm re-estimation for low-bit QAT (issue 12 experiments; not part of the library).

Nagel et al. 2022 ("Overcoming Oscillations in Quantization-Aware Training", arXiv
2203.11086, section 3.2): weights that oscillate between two grid points make the running
BatchNorm statistics, an exponential average over the last steps, disagree with the
statistics of the network as it stands; re-estimating them with the final weights
recovers accuracy. Here every folded BatchNorm (`QuantConvBn2d`) and plain BatchNorm
runs ``batches`` training batches without gradients, the first replacing the running
statistics and the rest averaged in (``momentum=None``), the quantizers frozen.

After a run (the checkpoint's test accuracy before and after):

    python scripts/bn_reestimation.py RUN_DIR/checkpoints/latest-epochNNN.ckpt [BATCHES]

At the BN freeze, as a callback beside the QAT callback (the statistics the remaining
epochs train with are then re-estimated ones):

    PYTHONPATH=scripts python train.py ... \
        +callbacks.bn_reestimation._target_=bn_reestimation.ReestimateAtFreeze \
        +callbacks.bn_reestimation.epoch=2
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_qat.nn.conv_bn import QuantConvBnMixin


@torch.no_grad()
def reestimate_batch_norm(model: nn.Module, inputs: Iterable[torch.Tensor], batches: int) -> int:
    """Running statistics of every BatchNorm of ``model`` from ``batches`` of ``inputs``
    (training mode, no gradients; folded ones frozen again after). Returns the batches
    used."""
    folded = [m for m in model.modules() if isinstance(m, QuantConvBnMixin)]
    plain = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    frozen = [m.bn_frozen for m in folded]
    momenta = [m.bn.momentum for m in folded] + [m.momentum for m in plain]
    was_training = model.training
    for layer in folded:
        layer.freeze_bn(False)
    for bn in [m.bn for m in folded] + plain:
        bn.num_batches_tracked.zero_()
        bn.momentum = None  # the first batch replaces the statistics, the rest average in
    model.train()
    used = 0
    for x in inputs:
        if used == batches:
            break
        model(x)
        used += 1
    for layer, was_frozen in zip(folded, frozen, strict=True):
        layer.freeze_bn(was_frozen)
    for bn, momentum in zip([m.bn for m in folded] + plain, momenta, strict=True):
        bn.momentum = momentum
    model.train(was_training)
    return used


def _batches(loader: Iterable, device: torch.device | str, channels_last: bool) -> Iterable:
    """``(images, labels)`` of ``loader`` on ``device``, images channels_last if asked."""
    for x, y in loader:
        x = x.to(device)
        yield (x.to(memory_format=torch.channels_last) if channels_last else x), y


def _images(loader: Iterable, device: torch.device | str, channels_last: bool) -> Iterable:
    return (x for x, _ in _batches(loader, device, channels_last))


class ReestimateAtFreeze(pl.Callback):
    """At the start of ``epoch`` (the QAT callback's ``freeze_bn_epoch``), re-estimate
    the BatchNorm statistics over ``batches`` training batches; the epoch then trains with
    them frozen."""

    def __init__(self, epoch: int, batches: int = 50):
        self.epoch = epoch
        self.batches = batches

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        channels_last = bool(getattr(pl_module, "channels_last", False))
        images = _images(trainer.train_dataloader, pl_module.device, channels_last)
        used = reestimate_batch_norm(pl_module.model, images, self.batches)
        print(f"BatchNorm statistics re-estimated over {used} batches at epoch {self.epoch}")


def main(argv: list[str]) -> None:
    from hydra.utils import instantiate

    from lightning_qat.app.experiment import build_module
    from lightning_qat.app.export_cli import _run_config
    from lightning_qat.checkpoint import restore_qat_checkpoint

    checkpoint = Path(argv[0])
    batches = int(argv[1]) if len(argv) > 1 else 50
    cfg = _run_config(checkpoint)
    module = restore_qat_checkpoint(build_module(cfg), checkpoint).eval()
    channels_last = bool(cfg.module.get("channels_last", False))
    model = module.model.to(memory_format=torch.channels_last) if channels_last else module.model
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")

    @torch.no_grad()
    def test_accuracy() -> float:
        model.eval()
        correct = total = 0
        for x, y in _batches(data.test_dataloader(), "cpu", channels_last):
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
        return 100 * correct / total

    before = test_accuracy()
    used = reestimate_batch_norm(
        model, _images(data.train_dataloader(), "cpu", channels_last), batches
    )
    after = test_accuracy()
    print(
        f"{checkpoint}: test {before:.2f}% -> {after:.2f}% (BatchNorm re-estimated, {used} batches)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
