"""The callback from LightningCLI (jsonargparse): on the command line with a nested
QuantConfig, and as a class_path/init_args YAML block; ``fit`` then ``test --ckpt_path``."""

import sys
from pathlib import Path

import pytest

from lightning_qat import QuantizationAwareTraining, quantized_layers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from lightning_cli import main  # noqa: E402

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _qat(cli) -> QuantizationAwareTraining:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining)]
    return callback


def test_callback_options_on_the_command_line_then_test_from_the_checkpoint(tmp_path):
    cli = main(
        [
            "fit",
            "--trainer.max_epochs=3",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=lightning_qat.QuantizationAwareTraining",
            "--trainer.callbacks.init_args.config.weight_bits=4",
            "--trainer.callbacks.init_args.config.symmetric=false",
            "--trainer.callbacks.init_args.start_epoch=1",
            "--trainer.callbacks.init_args.freeze_bn_epoch=2",
            "--trainer.callbacks.init_args.verbose=false",
            *QUIET,
        ]
    )
    callback = _qat(cli)
    assert (callback.config.weight_bits, callback.config.symmetric) == (4, False)
    assert callback.freeze_bn_epoch == 2 and callback.phase == "bn_frozen"
    layers = dict(quantized_layers(cli.model))
    assert layers and all(layer.weight_quantizer.bits == 4 for layer in layers.values())
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    (config,) = tmp_path.rglob("config.yaml")  # what LightningCLI saved of the run
    tested = main(["test", f"--config={config}", f"--ckpt_path={checkpoint}", *QUIET])
    # a fresh float model, converted by the checkpoint before its weights load
    assert dict(quantized_layers(tested.model)).keys() == layers.keys()
    assert tested.trainer.callback_metrics["test_acc"] > 0.8


def test_a_yaml_class_path_block_with_a_nested_quant_config(tmp_path):
    cli = main(
        [
            "fit",
            f"--config={ROOT / 'examples' / 'lightning_cli.yaml'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=2",
            *QUIET,
        ]
    )
    callback = _qat(cli)
    assert callback.start_epoch == 1 and callback.config.bn_fold
    assert callback.exported_paths["onnx"] == tmp_path / "model.int8.onnx"
    assert (tmp_path / "model.int8.onnx").stat().st_size > 0


def test_a_bad_value_is_refused_with_the_field_named(tmp_path):
    with pytest.raises(ValueError, match="weight_bits='eight' is not supported: use an integer"):
        main(
            [
                "fit",
                "--trainer.callbacks+=lightning_qat.QuantizationAwareTraining",
                "--trainer.callbacks.init_args.config.weight_bits=eight",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
