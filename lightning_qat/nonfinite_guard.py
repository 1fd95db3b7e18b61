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

        deferred: keep the check on the device for the whole epoch (no host
            synchronisation in a training step; on a GPU every read of a device value
            stalls the stream). ``None`` (default): deferred on accelerators, immediate on
            the CPU, whose reads cost nothing.

    The check is one flag on the device (reduced over the ranks under DDP, so every rank
    stops or skips alike). Immediate: it is read once per optimizer step, before the
    update. Deferred: the update runs, then is undone on the device where the flag is
    false (``torch.where`` against copies of the parameters, the optimizer state and the
    buffers taken before it: one extra copy of each in memory); ``"raise"`` undoes every
    step from the first non-finite one on and raises at the epoch's end, naming that step
    (the weights are those before it, as in immediate mode), ``"skip"`` counts the dropped
    steps on the device and logs them at the epoch's end. An optimizer state a dropped
    step created (the first step's momentum) is zeroed rather than removed. Under
    ``16-mixed`` precision the GradScaler owns overflowing gradients, so only BN
    statistics are checked.
    """

    def __init__(
        self,
        action: str = "raise",
        model_input: Callable[[Any], Any] = batch_input,
        log_prefix: str = "",
        deferred: bool | None = None,
    ):
        if action not in NONFINITE_ACTIONS:
            raise ValueError(
                f"on_nonfinite={action!r}: use one of "
                f"{', '.join(repr(a) for a in NONFINITE_ACTIONS)}"
            )
        self.action = action
        self.model_input = model_input
        self.log_prefix = log_prefix
        self.deferred = deferred
        self.skipped_steps = 0
        self._loss: torch.Tensor | None = None
        self._batch: Any = None
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._device_flags: _DeviceFlags | None = None

    def state_dict(self) -> dict[str, Any]:
        flags = self._device_flags  # read here: saving a checkpoint is not a training step
        return {"skipped_steps": self.skipped_steps + (int(flags.skipped) if flags else 0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        if self.deferred is None:
            self.deferred = pl_module.device.type != "cpu"
        if self.deferred and self._device_flags is None:
            self._device_flags = _DeviceFlags(pl_module.device, trainer.global_step)
        undoes = self.deferred or self.action == "skip"
        if undoes and batch_idx % trainer.accumulate_grad_batches == 0:
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
        if self._device_flags is not None:  # deferred: undone after the update if need be
            self._device_flags.before_update(finite, self.action, pl_module, optimizer)
            return
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

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._device_flags is not None and self._device_flags.pending:
            self._device_flags.after_update(self._snapshot or [])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch = self._loss = self._snapshot = None
        flags = self._device_flags
        if flags is not None:  # the epoch's one read of the deferred check
            self._device_flags = None
            if self.action == "raise" and not bool(flags.clean):
                raise NonFiniteError(
                    f"NaN/Inf at global step {int(flags.first_bad_step)} (found at the end "
                    f"of epoch {trainer.current_epoch}: the check stays on the device during "
                    "the epoch). No step from it on was applied: the weights are those "
                    "before it. NonFiniteGuard(deferred=False) names the layer at fault; "
                    "check the data and the learning rate, or set on_nonfinite='skip'."
                )
            skipped = int(flags.skipped)
            if skipped and not self.skipped_steps and trainer.is_global_zero:
                warnings.warn(
                    f"skipped {skipped} training step(s) with NaN/Inf in epoch "
                    f"{trainer.current_epoch}, the first at global step "
                    f"{int(flags.first_bad_step)} (counted in {self.log_prefix}skipped_steps)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.skipped_steps += skipped
        if self.action == "skip":
            pl_module.log(
                f"{self.log_prefix}skipped_steps", float(self.skipped_steps), rank_zero_only=True
            )

    def _input_of(self, batch: Any) -> Any:
        try:
            return self.model_input(batch)
        except Exception:  # only for the message: a batch it cannot read is not an error
            return None


class _DeviceFlags:
    """A deferred guard's state for one epoch, all on the device: whether every step so far
    was finite, how many were dropped, the first bad step, and this step's undo copies."""

    def __init__(self, device: torch.device, global_step: int):
        self.clean = torch.ones((), dtype=torch.bool, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        # counted on the device: making a tensor of trainer.global_step every step would
        # copy from the host
        self.step = torch.full((), global_step, dtype=torch.long, device=device)
        self.pending = False
        self._keep: torch.Tensor | None = None
        self._finite: torch.Tensor | None = None
        self._before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._optimizer: torch.optim.Optimizer | None = None

    @torch.no_grad()
    def before_update(
        self,
        finite: torch.Tensor,
        action: str,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        # "raise" keeps nothing from the first bad step on; "skip" drops bad steps alone
        self._keep = finite & self.clean if action == "raise" else finite
        self._finite = finite
        tensors = [p for p in module.parameters()]
        tensors += [
            v
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        ]
        self._before = [(t, t.detach().clone()) for t in tensors]
        self._optimizer = optimizer
        self.pending = True

    @torch.no_grad()
    def after_update(self, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        keep, finite = self._keep, self._finite
        for tensor, saved in [*self._before, *buffers]:
            tensor.copy_(torch.where(keep, tensor, saved))
        saved_ids = {id(t) for t, _ in self._before}
        for state in self._optimizer.state.values():  # created by this step
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and id(value) not in saved_ids:
                    state[key] = torch.where(keep, value, torch.zeros_like(value))
        self.first_bad_step.copy_(
            torch.where((self.first_bad_step < 0) & ~finite, self.step, self.first_bad_step)
        )
        self.skipped.add_((~finite).long())
        self.clean.logical_and_(finite)
        self.step.add_(1)
        self._before, self._optimizer, self.pending = [], None, False
