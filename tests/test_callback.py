"""QuantizationAwareTraining: schedule, optimizer carry-over, eval purity, errors, logging."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs
from omegaconf import OmegaConf
from torch import nn

from lightning_qat import (
    QuantConfig,
    QuantConvBn2d,
    QuantizationAwareTraining,
    quantized_layers,
    quantizers,
)


def qat(**kwargs):
    kwargs.setdefault("verbose", False)
    return QuantizationAwareTraining(QuantConfig(), **kwargs)


class Recorder(L.Callback):
    """Snapshots at every epoch start (after QAT's hook) and end."""

    def __init__(self):
        self.starts, self.ends = {}, {}

    def _snapshot(self, trainer, module):
        layers = dict(quantized_layers(module))
        conv = layers.get("net.0")
        return {
            "converted": bool(layers),
            "bn_frozen": bool(getattr(conv, "bn_frozen", False)),
            "observing": conv is not None and layers["net.4"].activation_quantizer.observer_enabled,
            "weights_observed": conv is not None and conv.weight_quantizer.observer_enabled,
            "act_scale": None
            if conv is None
            else layers["net.4"].activation_quantizer.scale.clone(),
            "bn_mean": module.net[1].running_mean.clone(),
            "param_ids": [id(p) for p in module.parameters()],
            "optimizer_ids": [
                id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]
            ],
            "momentum": sum(len(s) for s in trainer.optimizers[0].state.values()),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }

    def on_train_epoch_start(self, trainer, module):
        self.starts[trainer.current_epoch] = self._snapshot(trainer, module)

    def on_train_epoch_end(self, trainer, module):
        self.ends[trainer.current_epoch] = self._snapshot(trainer, module)


def test_schedule_converts_then_freezes_bn_then_observers(tmp_path):
    recorder = Recorder()
    callback = qat(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3)
    trainer = L.Trainer(callbacks=[callback, recorder], **trainer_kwargs(tmp_path))
    trainer.fit(DigitsClassifier(), DigitsData())
    s, e = recorder.starts, recorder.ends
    assert [s[i]["converted"] for i in range(5)] == [False, True, True, True, True]
    assert [s[i]["bn_frozen"] for i in range(5)] == [False, False, True, True, True]
    assert [s[i]["observing"] for i in range(5)] == [False, True, True, False, False]
    assert [s[i]["weights_observed"] for i in range(5)] == [False, True, True, True, True]
    # epoch 1 moves BN statistics and ranges; epoch 2 only ranges; epochs 3-4 neither
    assert not torch.equal(s[1]["bn_mean"], e[1]["bn_mean"])
    assert torch.equal(s[2]["bn_mean"], e[2]["bn_mean"])
    assert torch.equal(s[4]["bn_mean"], e[4]["bn_mean"])
    assert not torch.equal(e[1]["act_scale"], e[2]["act_scale"])
    assert torch.equal(e[3]["act_scale"], e[4]["act_scale"])
    assert callback.phase == "observers_frozen"


def test_freeze_weight_ranges_freezes_weight_scales_too(tmp_path):
    callback = qat(start_epoch=0, freeze_observer_epoch=1, freeze_weight_ranges=True)
    module = DigitsClassifier()
    trainer = L.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(module, DigitsData())
    assert all(not q.observer_enabled for _, q in quantizers(module))


def test_conversion_keeps_parameters_optimizer_state_and_lr_schedule(tmp_path):
    recorder = Recorder()
    trainer = L.Trainer(callbacks=[qat(start_epoch=2), recorder], **trainer_kwargs(tmp_path))
    trainer.fit(DigitsClassifier(), DigitsData())
    before, after = recorder.ends[1], recorder.starts[2]
    assert after["converted"] and not before["converted"]
    assert after["param_ids"] == before["param_ids"] == after["optimizer_ids"]
    assert after["momentum"] == before["momentum"] > 0  # momentum buffers carried over
    assert [recorder.starts[i]["lr"] for i in range(5)] == [0.05, 0.05, 0.025, 0.025, 0.0125]


def test_validation_and_test_never_update_observers_or_bn(tmp_path):
    module, data = DigitsClassifier(), DigitsData()
    trainer = L.Trainer(callbacks=[qat(start_epoch=0)], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(module, data)
    state = {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    trainer.validate(module, data, verbose=False)
    trainer.test(module, data, verbose=False)
    trainer.predict(module, data)
    for key, value in module.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(start_epoch=3, freeze_bn_epoch=2), r"start_epoch=3 comes after freeze_bn_epoch=2"),
        (
            dict(start_epoch=0, freeze_bn_epoch=4, freeze_observer_epoch=3),
            r"freeze_bn_epoch=4 comes after freeze_observer_epoch=3"
            r".*set freeze_observer_epoch to 4",
        ),
        (dict(start_epoch=-1), r"start_epoch=-1.*epoch number >= 0"),
        (dict(freeze_bn_epoch=1.5), r"freeze_bn_epoch=1.5.*or None"),
        (dict(calibration_batches=-2), r"calibration_batches=-2"),
    ],
)
def test_bad_schedules_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(QuantConfig(), **kwargs)


@pytest.mark.parametrize("config", [["abc"], "fbgemm", 1.2, 0, ("weight_bits", 4)])
def test_a_config_that_is_not_a_quant_config_is_refused_at_construction(config):
    # these constructed before, then fit crashed ('list' object has no attribute 'bn_fold')
    # or, for 0, silently used the defaults
    with pytest.raises(TypeError, match=r"pass a lightning_qat\.QuantConfig, a mapping"):
        QuantizationAwareTraining(config)


def test_a_mapping_with_an_unknown_field_names_the_fields():
    with pytest.raises(TypeError, match=r"unknown QuantConfig field.*wieght_bits.*weight_bits"):
        QuantizationAwareTraining({"wieght_bits": 4})
    # Hydra's DictConfig is a mapping too
    config = OmegaConf.create({"weight_bits": 4, "symmetric": False})
    assert QuantizationAwareTraining(config).config == QuantConfig(weight_bits=4, symmetric=False)
    assert QuantizationAwareTraining(None).config == QuantConfig()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(calibration_batches=1.5), r"calibration_batches=1.5\): use a number of batches"),
        (dict(calibration_input="x"), r"calibration_input='x'.*function"),
        (dict(fuse_pairs=["conv", "bn"]), r"fuse_pairs=.*\(conv, bn\) pairs"),
        (dict(fuse_pairs="conv,bn"), r"fuse_pairs=.*\(conv, bn\) pairs"),
        (dict(verbose="yes"), r"verbose='yes'.*True or False"),
        (dict(log_layer_stats=1), r"log_layer_stats=1.*True or False"),
    ],
)
def test_other_bad_arguments_are_refused_with_what_to_pass(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        QuantizationAwareTraining(QuantConfig(), **kwargs)


def test_config_as_dict_is_validated():
    assert QuantizationAwareTraining({"weight_bits": 4}).config.weight_bits == 4
    with pytest.raises(ValueError, match="weight_bits=12"):
        QuantizationAwareTraining({"weight_bits": 12})


class NothingToQuantize(DigitsClassifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.LazyLinear(10))


def test_model_with_nothing_to_quantize_fails_before_training(tmp_path):
    callback = QuantizationAwareTraining(QuantConfig(exclude=["net.*"]), start_epoch=3)
    trainer = L.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="nothing to quantize"):
        trainer.fit(DigitsClassifier(), DigitsData())
    assert trainer.current_epoch == 0


def test_start_after_the_last_epoch_warns(tmp_path):
    trainer = L.Trainer(callbacks=[qat(start_epoch=5)], **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.warns(UserWarning, match="starts at epoch 5 but the Trainer stops after 1"):
        trainer.fit(DigitsClassifier(), DigitsData())


def test_calibration_sets_activation_ranges_before_the_first_qat_step(tmp_path):
    scales = {}

    class Peek(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                scales["first"] = dict(quantized_layers(module))[
                    "net.4"
                ].activation_quantizer.scale.clone()

    callback = qat(start_epoch=0, calibration_batches=2)
    trainer = L.Trainer(callbacks=[callback, Peek()], **trainer_kwargs(tmp_path, max_epochs=1))
    module = DigitsClassifier()
    trainer.fit(module, DigitsData())
    assert scales["first"] != 1.0  # the initial scale, had nothing been observed


def test_works_beside_checkpointing_early_stopping_accumulation_and_clipping(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    stopping = EarlyStopping(monitor="val_loss", patience=10)
    callback = qat(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3)
    trainer = L.Trainer(
        callbacks=[callback, checkpoint, stopping],
        **trainer_kwargs(
            tmp_path, enable_checkpointing=True, accumulate_grad_batches=2, gradient_clip_val=0.5
        ),
    )
    module = DigitsClassifier()
    trainer.fit(module, DigitsData())
    assert trainer.current_epoch == 5 and callback.phase == "observers_frozen"
    assert trainer.callback_metrics["val_acc"] > 0.5
    assert checkpoint.best_model_path and (tmp_path / "ckpt" / "last.ckpt").exists()


def test_logs_phases_and_layer_statistics_to_the_attached_logger(tmp_path, capsys):
    logger = CSVLogger(tmp_path, name="run")
    callback = QuantizationAwareTraining(
        QuantConfig(), start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3, verbose=True
    )
    trainer = L.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, logger=logger))
    trainer.fit(DigitsClassifier(), DigitsData())
    out = capsys.readouterr().out
    assert "quantized layers" in out and "QuantConvBn2d" in out and "folded" in out
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    phases = [(int(r["step"]), float(r["qat/phase"])) for r in rows if r.get("qat/phase")]
    # at each epoch's first and last step: a step chart (16 steps an epoch)
    assert [p for _, p in phases] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    assert [s for s, _ in phases[:4]] == [0, 15, 16, 31]
    sqnr = [float(r["qat.net.4/weight_sqnr_db"]) for r in rows if r.get("qat.net.4/weight_sqnr_db")]
    assert len(sqnr) == 4 and all(30 < v < 60 for v in sqnr)  # about 6 dB a bit at 8 bits
    clipped = [float(r["qat.net.4/act_clipped"]) for r in rows if r.get("qat.net.4/act_clipped")]
    assert clipped and all(0 <= v < 0.05 for v in clipped)
    scales = [float(r["qat.net.4/act_scale"]) for r in rows if r.get("qat.net.4/act_scale")]
    assert len(scales) == 4 and all(v > 0 for v in scales)
    assert not any(r.get("qat.net.0/act_scale") for r in rows)  # first layer input stays float
    # at the end, the table of the quantized layers beside the metrics
    with open(logger.log_dir + "/qat_layers.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["layer"] for r in table] == ["net.0", "net.4", "net.9", "net.11"]
    assert table[1]["kind"] == "QuantConvBn2d" and float(table[1]["act_scale"]) == scales[-1]
    assert table[0]["act_scale"] == "-" and float(table[1]["weight_sqnr_db"]) > 30


def test_bf16_mixed_precision_trains(tmp_path):
    module = DigitsClassifier()
    trainer = L.Trainer(
        callbacks=[qat(start_epoch=0, freeze_bn_epoch=1)],
        **trainer_kwargs(tmp_path, max_epochs=2, precision="bf16-mixed"),
    )
    trainer.fit(module, DigitsData())
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert trainer.callback_metrics["val_acc"] > 0.3
    for _, q in quantizers(module):
        assert q.scale.dtype == torch.float32 and torch.isfinite(q.scale).all()
    assert any(isinstance(m, QuantConvBn2d) for m in module.modules())


def test_unfolded_float_batchnorm_is_frozen_across_validation_runs(tmp_path):
    recorder = Recorder()
    callback = QuantizationAwareTraining(
        QuantConfig(bn_fold=False), start_epoch=0, freeze_bn_epoch=1, verbose=False
    )
    module = DigitsClassifier()
    trainer = L.Trainer(
        callbacks=[callback, recorder],
        **trainer_kwargs(tmp_path, max_epochs=3, val_check_interval=0.5),  # validation mid-epoch
    )
    trainer.fit(module, DigitsData())
    assert type(module.net[1]) is nn.BatchNorm2d
    assert not torch.equal(recorder.starts[0]["bn_mean"], recorder.ends[0]["bn_mean"])
    assert torch.equal(recorder.starts[1]["bn_mean"], recorder.ends[2]["bn_mean"])
