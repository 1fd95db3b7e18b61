"""`NonFiniteGuard`: stop (or skip) a training step with NaN/Inf before it reaches the
weights. The QAT callback runs one itself; FP32 runs can add it on its own."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from lightning_qat.calibrate import batch_input
from lightning_qat.nonfinite import (
    NonFiniteError,
    describe_nonfinite,
    restore_state,
    snapshot_state,
    step_is_finite,
)

#: What a training step with NaN/Inf in its loss, gradients or BN statistics does.
NONFINITE_ACTIONS = ("raise", "skip")


class NonFiniteGuard(L.Callback):
    """Checks every training step's loss, gradients and BatchNorm statistics for NaN/Inf
    after the backward and before the optimizer applies it.

    Fake quantization maps NaN to finite codes, so one NaN pixel turns BN statistics and
    weights to NaN while the loss stays finite; without this check such a run trains on.

    Args:
        action: ``"raise"``: stop with a `NonFiniteError` naming the step and the first
            layer at fault; the weights stay those of the step before. ``"skip"``: drop
            the step (no update; every buffer, BN statistics and quantizer ranges,
            restored from before the step's first batch) and log ``skipped_steps``.
        model_input: picks the model input out of a batch, to count its NaN/Inf in the
            message.
        log_prefix: prefix of the logged ``skipped_steps``.

    The check is one flag on the device; it is read once per optimizer step (and reduced
    over the ranks under DDP, so every rank stops or skips alike). Under ``16-mixed``
    precision the GradScaler owns overflowing gradients, so only BN statistics are checked.
    """

    def __init__(
        self,
        action: str = "raise",
        model_input: Callable[[Any], Any] = batch_input,
        log_prefix: str = "",
    ):
        if action not in NONFINITE_ACTIONS:
            raise ValueError(
                f"on_nonfinite={action!r}: use one of "
                f"{', '.join(repr(a) for a in NONFINITE_ACTIONS)}"
            )
        self.action = action
        self.model_input = model_input
        self.log_prefix = log_prefix
        self.skipped_steps = 0
        self._loss: torch.Tensor | None = None
        self._batch: Any = None
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        if self.action == "skip" and batch_idx % trainer.accumulate_grad_batches == 0:
            # the state before the optimizer step's first batch, to undo a dropped step
            self._snapshot = snapshot_state(pl_module)

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning calls this after the backward (and the GradScaler's unscaling), before
        # the update: the last moment a NaN can be kept out of the weights.
        amp_fp16 = str(trainer.precision).startswith("16")
        finite = step_is_finite(
            pl_module, None if amp_fp16 else self._loss, check_grads=not amp_fp16
        )
        if trainer.world_size > 1:
            # one rank's NaN batch must stop (or skip on) every rank alike
            finite = trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        if bool(finite):
            return
        where = (
            f"global step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx})"
        )
        detail = describe_nonfinite(pl_module, self._loss, self._input_of(self._batch))
        if self.action == "raise":
            raise NonFiniteError(
                f"NaN/Inf at {where}: {detail}. The weights were not updated. Check the data "
                "and the learning rate, or set on_nonfinite='skip' to drop such steps."
            )
        for parameter in pl_module.parameters():
            parameter.grad = None  # torch's optimizers leave a parameter without grad alone
        if self._snapshot is not None:
            restore_state(self._snapshot)
        self.skipped_steps += 1
        if self.skipped_steps == 1 and trainer.is_global_zero:
            warnings.warn(
                f"skipped the training step at {where}: {detail} (counted in "
                f"{self.log_prefix}skipped_steps)",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch = self._loss = self._snapshot = None
        if self.action == "skip":
            pl_module.log(
                f"{self.log_prefix}skipped_steps", float(self.skipped_steps), rank_zero_only=True
            )

    def _input_of(self, batch: Any) -> Any:
        try:
            return self.model_input(batch)
        except Exception:  # only for the message: a batch it cannot read is not an error
            return None
