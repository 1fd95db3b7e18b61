"""A NaN in a training step stops the run (or is skipped) before it reaches the weights.

Fake quantization maps NaN to finite codes: without the guard, one NaN pixel turned the
first layer's BN statistics and weights to NaN while the loss stayed finite (~2.3) and the
run trained on to 10% accuracy."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs

from lightning_qat import NonFiniteError, NonFiniteGuard, QuantConfig, QuantizationAwareTraining

POISONED = 3 * 32 + 5  # a training image of the fourth batch (batch size 32, unshuffled)


class PoisonedDigits(DigitsData):
    """The digits with one NaN pixel in one training image."""

    def __init__(self, value: float = math.nan, **kwargs):
        super().__init__(**kwargs)
        self.train_set.tensors[0][POISONED, 0, 4, 4] = value


def _qat(**kwargs):
    return QuantizationAwareTraining(QuantConfig(), verbose=False, **kwargs)


def _finite(module: torch.nn.Module) -> bool:
    return all(
        bool(torch.isfinite(t).all())
        for t in module.state_dict().values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )


def test_without_the_guard_fake_quantization_hides_the_nan(tmp_path):
    """The failure the guard exists for (fails if the fake quantizers stop hiding NaN:
    then this test, not the guard, is what needs revisiting)."""

    class Unguarded(QuantizationAwareTraining):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pass

    module = DigitsClassifier()
    trainer = L.Trainer(
        callbacks=[Unguarded(QuantConfig(), verbose=False)],
        **trainer_kwargs(tmp_path, max_epochs=1),
    )
    trainer.fit(module, PoisonedDigits())
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
    assert not _finite(module)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_nonfinite_input_stops_qat_naming_the_step_and_layer(value, tmp_path):
    module = DigitsClassifier()
    trainer = L.Trainer(callbacks=[_qat()], **trainer_kwargs(tmp_path, max_epochs=2))
    with pytest.raises(NonFiniteError) as error:
        trainer.fit(module, PoisonedDigits(value))
    message = str(error.value)
    assert "global step 3 (epoch 0, batch 3)" in message, message
    assert "first layer at fault: net.0" in message, message
    assert "the batch's input holds 1 NaN/Inf value(s)" in message, message
    assert trainer.global_step == 3  # the poisoned step was not applied
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_a_nan_before_conversion_stops_the_run_too(tmp_path):
    trainer = L.Trainer(callbacks=[_qat(start_epoch=1)], **trainer_kwargs(tmp_path, max_epochs=2))
    with pytest.raises(NonFiniteError, match="loss = nan"):
        trainer.fit(DigitsClassifier(), PoisonedDigits())


def test_skip_drops_the_step_and_restores_the_statistics(tmp_path):
    """``on_nonfinite="skip"``: the run ends with finite weights, BN statistics and ranges,
    equal to a run that never saw the poisoned batch's update."""
    module = DigitsClassifier()
    logger = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(
        callbacks=[_qat(on_nonfinite="skip")],
        **trainer_kwargs(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1),
    )
    with pytest.warns(RuntimeWarning, match="skipped the training step at global step 3"):
        trainer.fit(module, PoisonedDigits())
    assert _finite(module)
    assert trainer.callbacks[0].nonfinite_guard.skipped_steps == 2  # once per epoch
    assert trainer.global_step == 2 * 16  # Lightning still counts the skipped steps
    assert float(trainer.callback_metrics["qat/skipped_steps"]) == 2
    assert trainer.callback_metrics["val_acc"] > 0.5  # it learns (a NaN-trained net: 10%)


def test_skipping_one_step_is_removing_that_batch(tmp_path):
    """What ``skip`` restores is exactly the state before the step: the skipped run equals
    a run whose poisoned batch has zero learning rate (same batches, same order)."""

    class ZeroLrAtPoison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lr = 0.0 if batch_idx == POISONED // 32 else pl_module.hparams.lr
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = lr

    def fit(data, *callbacks):
        torch.manual_seed(0)
        module = DigitsClassifier()
        module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.05)
        trainer = L.Trainer(callbacks=list(callbacks), **trainer_kwargs(tmp_path, max_epochs=1))
        trainer.fit(module, data)
        return module

    skipped = fit(PoisonedDigits(), _qat(on_nonfinite="skip"))
    # the reference sees a finite copy of the batch, with nothing learnt from it; its BN
    # statistics and ranges moved, so those are restored by hand after the step
    reference_data = DigitsData()
    reference = fit(reference_data, _qat(), ZeroLrAtPoison(), _RestoreAt(POISONED // 32))
    pairs = zip(skipped.state_dict().items(), reference.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


class _RestoreAt(L.Callback):
    """Puts every buffer back as it was before batch ``index``: what ``skip`` does."""

    def __init__(self, index: int):
        self.index = index

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.index:
            self.saved = [(b, b.clone()) for b in pl_module.buffers()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.index:
            for buffer, saved in self.saved:
                buffer.copy_(saved)


def test_the_guard_alone_stops_an_fp32_run(tmp_path):
    trainer = L.Trainer(callbacks=[NonFiniteGuard()], **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(NonFiniteError, match=r"global step 3 .*loss = nan"):
        trainer.fit(DigitsClassifier(), PoisonedDigits())


def test_a_bad_action_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite='ignore': use one of 'raise', 'skip'"):
        _qat(on_nonfinite="ignore")


def _deferred_qat(**kwargs) -> QuantizationAwareTraining:
    """The QAT callback with the guard as it runs on an accelerator: checks stay on the
    device for the epoch (the CPU reads them at once by default)."""
    qat = _qat(**kwargs)
    qat.nonfinite_guard.deferred = True
    return qat


def _fit(tmp_path, qat, max_epochs=2, data=None):
    torch.manual_seed(0)
    module = DigitsClassifier()
    trainer = L.Trainer(callbacks=[qat], **trainer_kwargs(tmp_path, max_epochs=max_epochs))
    return module, trainer, data or PoisonedDigits()


def test_deferred_raise_ends_the_epoch_on_the_weights_before_the_bad_step(tmp_path):
    """Deferred, the run goes on to the epoch's end with every step from the NaN on undone
    on the device, then raises naming the step: its weights equal those of the immediate
    check, which stops before the update."""
    immediate, trainer, data = _fit(tmp_path, _qat())
    with pytest.raises(NonFiniteError):
        trainer.fit(immediate, data)
    deferred, trainer, data = _fit(tmp_path, _deferred_qat())
    with pytest.raises(NonFiniteError, match=r"global step 3 \(found at the end of epoch 0"):
        trainer.fit(deferred, data)
    assert trainer.global_step == 16  # the epoch ran on; its updates were undone
    for (name, a), b in zip(deferred.named_parameters(), immediate.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert _finite(deferred)  # BN statistics and ranges restored too


def test_deferred_skip_equals_the_immediate_skip(tmp_path):
    """Deferred ``skip`` (update, then undone on the device) ends on exactly the state of
    the immediate one (no update), optimizer momentum included, and counts alike."""
    runs = []
    for qat in (_qat(on_nonfinite="skip"), _deferred_qat(on_nonfinite="skip")):
        module, trainer, data = _fit(tmp_path, qat)
        with pytest.warns(RuntimeWarning, match="global step 3"):
            trainer.fit(module, data)
        assert qat.nonfinite_guard.skipped_steps == 2
        assert float(trainer.callback_metrics["qat/skipped_steps"]) == 2
        runs.append((module, trainer.optimizers[0]))
    (immediate, sgd), (deferred, deferred_sgd) = runs
    for (name, a), b in zip(
        deferred.state_dict().items(), immediate.state_dict().values(), strict=True
    ):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for a, b in zip(deferred.parameters(), immediate.parameters(), strict=True):
        momentum = deferred_sgd.state[a]["momentum_buffer"]
        torch.testing.assert_close(momentum, sgd.state[b]["momentum_buffer"], rtol=0, atol=0)


class _NoHostReads:
    """Makes reading a tensor's value on the host (``bool``, ``item``, ``int``, ``float``,
    ``tolist``) raise: what stalls a GPU stream in a training step."""

    NAMES = ("__bool__", "item", "__int__", "__float__", "tolist")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(*args, **kwargs):
            raise AssertionError("a host read of a device value in a training step")

        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


class _QatWithoutHostReads(QuantizationAwareTraining):
    """The callback's per-step hooks, each run where host reads raise."""


for _hook in (
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
):

    def _wrapped(self, *args, _hook=_hook):
        with _NoHostReads():
            return getattr(QuantizationAwareTraining, _hook)(self, *args)

    setattr(_QatWithoutHostReads, _hook, _wrapped)


@pytest.mark.parametrize("action", ["raise", "skip"])
def test_the_deferred_guard_reads_nothing_on_the_host_in_a_step(action, tmp_path):
    qat = _QatWithoutHostReads(QuantConfig(), verbose=False, on_nonfinite=action)
    qat.nonfinite_guard.deferred = True
    module, trainer, _ = _fit(tmp_path, qat, max_epochs=1)
    trainer.fit(module, DigitsData())  # finite: nothing to raise at the epoch's end
    assert trainer.global_step == 16 and _finite(module)
    immediate = _QatWithoutHostReads(QuantConfig(), verbose=False, on_nonfinite=action)
    immediate.nonfinite_guard.deferred = False  # the check this test exists to catch
    module, trainer, _ = _fit(tmp_path, immediate, max_epochs=1)
    with pytest.raises(AssertionError, match="a host read"):
        trainer.fit(module, DigitsData())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_guard_defers_and_skips_alike(tmp_path):
    qat = _qat(on_nonfinite="skip")
    torch.manual_seed(0)
    module = DigitsClassifier()
    kwargs = trainer_kwargs(tmp_path, max_epochs=1, accelerator="cuda", deterministic=False)
    trainer = L.Trainer(callbacks=[qat], **kwargs)
    with pytest.warns(RuntimeWarning, match="global step 3"):
        trainer.fit(module, PoisonedDigits())
    assert qat.nonfinite_guard.deferred is True
    assert qat.nonfinite_guard.skipped_steps == 1 and _finite(module)
