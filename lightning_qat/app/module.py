"""`ImageClassifier`: the app's LightningModule. Nothing in it knows about quantization."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class ImageClassifier(L.LightningModule):
    """Cross-entropy classification with torchmetrics accuracy.

    Args:
        model: the network.
        optimizer: builds the optimizer from the parameters (a Hydra ``_partial_``).
        scheduler: builds the LR scheduler from the optimizer, stepped every epoch; a
            ``torch.optim.lr_scheduler.OneCycleLR`` is stepped every batch and gets
            ``total_steps`` from the Trainer.
        num_classes: for the accuracy metrics.
        channels_last: run convolutions in NHWC (faster on CPUs with oneDNN).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        num_classes: int = 10,
        channels_last: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.channels_last = channels_last
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _step(self, batch, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(1)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        func = getattr(self.scheduler_factory, "func", self.scheduler_factory)
        if func is torch.optim.lr_scheduler.OneCycleLR:
            steps = int(self.trainer.estimated_stepping_batches)
            scheduler = self.scheduler_factory(optimizer, total_steps=steps)
            return [optimizer], [{"scheduler": scheduler, "interval": "step"}]
        return [optimizer], [{"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}]
