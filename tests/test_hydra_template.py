"""The callbacks snippet for lightning-hydra-template style projects composes with Hydra and
instantiates as that template does (every callbacks entry with a _target_)."""

import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_qat import QuantConfig, QuantizationAwareTraining

SNIPPET = Path(__file__).parents[1] / "examples" / "hydra_template" / "callbacks"


def test_template_callbacks_snippet_instantiates_with_a_nested_quant_config(tmp_path):
    shutil.copytree(SNIPPET, tmp_path / "callbacks")
    (tmp_path / "train.yaml").write_text(
        "defaults:\n  - callbacks: quantization_aware_training\n  - _self_\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        override = "callbacks.quantization_aware_training.config.weight_bits=4"
        cfg = compose("train", overrides=[override])
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if "_target_" in c]
    assert len(callbacks) == 1 and isinstance(callbacks[0], QuantizationAwareTraining)
    qat = callbacks[0]
    assert qat.config == QuantConfig(weight_bits=4)  # the snippet's other fields: the defaults
    assert (qat.start_epoch, qat.freeze_bn_epoch, qat.freeze_observer_epoch) == (0, 2, 3)
    assert qat.calibration_batches == 8
