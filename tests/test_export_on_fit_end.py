"""``export_on_fit_end``: any ``Trainer.fit`` leaves a deployable int8 ONNX file (and the
integer reference), on rank zero, with the path logged (Lightning 1.x's
``quantize_on_fit_end``, deployable)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs

from lightning_qat import QuantConfig, QuantizationAwareTraining
from lightning_qat.export import OnnxRuntimeModel, evaluate_deployment


def _qat(**kwargs):
    return QuantizationAwareTraining(QuantConfig(), verbose=False, **kwargs)


@pytest.mark.parametrize("example", ["example_input_array", "first_batch"])
def test_fit_writes_the_onnx_model_and_the_integer_reference(tmp_path, example):
    module = DigitsClassifier()
    if example == "example_input_array":
        module.example_input_array = torch.zeros(2, 1, 8, 8)
    callback = _qat(start_epoch=1, export_on_fit_end="deploy/model.int8.onnx", export_integer=True)
    logger = CSVLogger(tmp_path, name="csv", version="")
    trainer = L.Trainer(
        callbacks=[callback], **trainer_kwargs(tmp_path, max_epochs=3, logger=logger)
    )
    data = DigitsData()
    trainer.fit(module, data)
    onnx_path = tmp_path / "deploy" / "model.int8.onnx"
    integer_path = tmp_path / "deploy" / "model.integer.pt"
    assert callback.exported_paths == {"onnx": onnx_path, "integer": integer_path}
    assert onnx_path.stat().st_size > 0
    # the file is the trained model, deployed: its top-1 is the fake-quant model's
    measured = evaluate_deployment(
        OnnxRuntimeModel(onnx_path), module, data.val_dataloader(), "onnx"
    )
    assert measured["onnx_agreement"] >= 0.99, measured
    integer = torch.load(integer_path, weights_only=False)
    assert (
        evaluate_deployment(integer, module, data.val_dataloader(), "int")["int_agreement"] >= 0.99
    )
    hparams = (tmp_path / "csv" / "hparams.yaml").read_text()
    assert f"qat/onnx_path: {onnx_path}" in hparams


def test_a_fit_that_never_converted_warns_and_writes_nothing(tmp_path):
    callback = _qat(start_epoch=5, export_on_fit_end="model.onnx")
    trainer = L.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.warns(UserWarning, match="the model is float, so model.onnx was not written"):
        trainer.fit(DigitsClassifier(), DigitsData())
    assert not (tmp_path / "model.onnx").exists() and callback.exported_paths == {}


def test_bad_export_arguments_are_refused():
    with pytest.raises(TypeError, match="export_on_fit_end=3"):
        _qat(export_on_fit_end=3)
    with pytest.raises(ValueError, match=r"set export_on_fit_end=<path\.onnx> too"):
        _qat(export_integer=True)
