"""`ImageClassifier`: the app's LightningModule. Nothing in it knows about quantization."""

from __future__ import annotations

import math
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
        distillation_weight: ``α`` in ``(1 - α) CE(z_s, y) + α T² KL(softmax(z_t / T) ||
            softmax(z_s / T))`` (knowledge distillation, Hinton et al. 2015, section 2),
            ``z_t`` the logits of the teacher set by `set_teacher` (the float model a
            low-bit QAT run starts from; Esser et al. 2019 report LSQ with distillation
            from the full-precision model too); 0 (default): plain cross-entropy.
            Training only: validation and test losses stay CE.
        distillation_temperature: ``T``, finite and > 0.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        num_classes: int = 10,
        channels_last: bool = False,
        distillation_weight: float = 0.0,
        distillation_temperature: float = 1.0,
    ):
        super().__init__()
        if not 0.0 <= distillation_weight <= 1.0:
            raise ValueError(
                f"module.distillation_weight={distillation_weight!r} must be in [0, 1] "
                "(the share of the distillation loss; 0 trains on the labels alone)"
            )
        if not 0 < distillation_temperature < math.inf:  # inf: every soft target uniform
            raise ValueError(
                f"module.distillation_temperature={distillation_temperature!r} must be a "
                "finite number > 0"
            )
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.distillation_weight = distillation_weight
        self.distillation_temperature = distillation_temperature
        # kept out of the module tree: not a checkpointed Parameter, not converted to
        # fake quantization with the model, never switched to training mode
        self._teacher: list[nn.Module] = []
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

    @property
    def teacher(self) -> nn.Module | None:
        """The distillation teacher (`set_teacher`), or None."""
        return self._teacher[0] if self._teacher else None

    def set_teacher(self, teacher: nn.Module) -> None:
        """Distill from ``teacher`` (frozen, in eval mode, moved to this module's device
        when fit starts); it is not part of the state dict or the checkpoints."""
        if self.distillation_weight == 0:
            raise ValueError(
                "set_teacher: module.distillation_weight is 0, so the teacher would not be "
                "used; set it in (0, 1]"
            )
        teacher = teacher.eval().requires_grad_(False)
        if self.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        self._teacher = [teacher]

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def _distillation_loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``T² KL(softmax(z_t / T) || softmax(z_s / T))``, batch mean (Hinton et al. 2015:
        the ``T²`` keeps its gradients' scale independent of ``T``)."""
        t = self.distillation_temperature
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return (
            nn.functional.kl_div(
                nn.functional.log_softmax(logits.float() / t, dim=1),
                nn.functional.log_softmax(teacher_logits.float() / t, dim=1),
                reduction="batchmean",
                log_target=True,
            )
            * t
            * t
        )

    def _step(self, batch, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        if stage == "train" and self.teacher is not None:
            distillation = self._distillation_loss(x, logits)
            self.log("train_distillation_loss", distillation, on_step=False, on_epoch=True)
            alpha = self.distillation_weight
            loss = (1 - alpha) * loss + alpha * distillation
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
