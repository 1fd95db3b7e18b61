"""Resuming from a checkpoint at every QAT phase ends exactly where the uninterrupted run
ends; checkpoints restore into Trainer.validate/test/predict and into fresh models."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs

from lightning_qat import (
    QuantConfig,
    QuantizationAwareTraining,
    load_qat_checkpoint,
    quantized_layers,
    restore_qat_checkpoint,
)

SCHEDULE = dict(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3)
CONFIG = QuantConfig(symmetric=False, weight_bits=4)


def run(tmp_path, name, ckpt_path=None, max_epochs=5, arch="lenet"):
    L.seed_everything(0, verbose=False)
    module = DigitsClassifier(arch=arch)
    callback = QuantizationAwareTraining(CONFIG, verbose=False, **SCHEDULE)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / name, filename="{epoch}", save_top_k=-1, every_n_epochs=1
    )
    trainer = L.Trainer(
        callbacks=[callback, checkpoints],
        **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True),
    )
    trainer.fit(module, DigitsData(), ckpt_path=ckpt_path)
    return module, callback, trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    module, callback, trainer = run(tmp_path, "full")
    return tmp_path, module, callback, dict(trainer.callback_metrics)


@pytest.mark.parametrize(
    ("epoch", "phase"),
    [
        (0, "before conversion"),
        (1, "after conversion"),
        (2, "after BN freeze"),
        (3, "after observer freeze"),
    ],
)
def test_resume_at_each_phase_ends_with_identical_state(uninterrupted, epoch, phase):
    tmp_path, full, full_callback, full_metrics = uninterrupted
    ckpt = tmp_path / "full" / f"epoch={epoch}.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert (
        saved["callbacks"]["QuantizationAwareTraining"]["phase"]
        == ["float", "qat", "bn_frozen", "observers_frozen"][epoch]
    )
    resumed, callback, trainer = run(tmp_path, f"resumed{epoch}", ckpt_path=ckpt)
    expected = full.state_dict()
    got = resumed.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), f"{key} differs after resuming {phase}"
        else:
            assert got[key] == value, key
    assert callback.phase == full_callback.phase == "observers_frozen"
    for key in ("val_loss", "val_acc", "train_loss"):
        assert torch.equal(trainer.callback_metrics[key], full_metrics[key]), key


def test_a_residual_model_resumes_exactly_with_its_standalone_quantizers(tmp_path):
    """The quantizers of residual adds live on module boundaries (hooks): a resumed run
    rebuilds them before the checkpoint loads and ends on the uninterrupted run's state."""
    full, _, _ = run(tmp_path, "full", max_epochs=4, arch="resnet8")
    expected = full.state_dict()
    assert any(".output_quantizer." in key for key in expected)
    for epoch in (1, 3):  # just converted; observers frozen
        ckpt = tmp_path / "full" / f"epoch={epoch}.ckpt"
        resumed, _, _ = run(tmp_path, f"resumed{epoch}", ckpt, max_epochs=4, arch="resnet8")
        got = resumed.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), f"{key} differs after resuming at {epoch}"
    restored = restore_qat_checkpoint(DigitsClassifier(arch="resnet8"), ckpt)
    x = torch.stack([DigitsData().val_set[i][0] for i in range(16)])
    with torch.no_grad():
        assert torch.equal(restored(x), full.eval()(x))


def test_config_mismatch_on_resume_is_an_error(uninterrupted, tmp_path):
    ckpt = uninterrupted[0] / "full" / "epoch=1.ckpt"
    callback = QuantizationAwareTraining(QuantConfig(), verbose=False, **SCHEDULE)
    trainer = L.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    with pytest.raises((ValueError, RuntimeError), match=r"QuantConfig|size mismatch"):
        trainer.fit(DigitsClassifier(), DigitsData(), ckpt_path=ckpt)


def test_validate_test_predict_from_checkpoint_after_fit(uninterrupted, tmp_path):
    ckpt_dir, full, _, metrics = uninterrupted
    ckpt = ckpt_dir / "full" / "epoch=4.ckpt"
    data = DigitsData()
    # a fresh module and Trainer, the callback attached: the checkpoint converts the model
    module = DigitsClassifier()
    callback = QuantizationAwareTraining(CONFIG, verbose=False, **SCHEDULE)
    trainer = L.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    validated = trainer.validate(module, data, ckpt_path=ckpt, verbose=False)[0]
    tested = trainer.test(module, data, ckpt_path=ckpt, verbose=False)[0]
    predicted = torch.cat(trainer.predict(module, data, ckpt_path=ckpt))
    assert validated["val_acc"] == pytest.approx(metrics["val_acc"].item())
    assert tested["test_acc"] == pytest.approx(metrics["val_acc"].item())
    full.eval()
    x = torch.stack([data.val_set[i][0] for i in range(len(data.val_set))])
    with torch.no_grad():
        assert torch.equal(predicted, full(x).argmax(1))
    assert dict(quantized_layers(module))


def test_checkpoint_restores_into_a_fresh_model_outside_a_trainer(uninterrupted):
    ckpt_dir, full, _, _ = uninterrupted
    ckpt = ckpt_dir / "full" / "epoch=4.ckpt"
    x = torch.stack([DigitsData().val_set[i][0] for i in range(16)])
    full.eval()
    with torch.no_grad():
        expected = full(x)
        # the fix for Lightning 1.x's load_from_checkpoint failing on fake-quant keys
        loaded = load_qat_checkpoint(DigitsClassifier, ckpt)
        assert torch.equal(loaded(x), expected)
        restored = restore_qat_checkpoint(DigitsClassifier(), ckpt)
        assert torch.equal(restored(x), expected)
    assert not restored.training
    layer = dict(quantized_layers(restored))["net.4"]
    assert layer.weight_quantizer.bits == 4 and not layer.weight_quantizer.symmetric
    assert layer.bn_frozen and not layer.activation_quantizer.observer_enabled


def test_float_checkpoint_restores_as_float(uninterrupted):
    ckpt = uninterrupted[0] / "full" / "epoch=0.ckpt"
    model = restore_qat_checkpoint(DigitsClassifier(), ckpt)
    assert not dict(quantized_layers(model))
