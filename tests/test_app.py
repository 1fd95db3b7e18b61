"""The Hydra app: recipes compose, bad input fails with the choices, runs write results,
multirun + report, optuna, several loggers at once (W&B offline)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_qat.app.experiment import build_module, check_experiment, register_recipes
from lightning_qat.app.module import ImageClassifier
from lightning_qat.app.report import method
from lightning_qat.app.run_folder import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
FAST = ["callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def train(*overrides, cwd, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture
def composed():
    register_recipes(ROOT / "recipes")
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):

        def _compose(*overrides):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            return cfg

        yield _compose
    GlobalHydra.instance().clear()


def test_the_recipes_are_the_ones_documented():
    assert {
        "digits_qat",
        "lenet_mnist_qat",
        "nin_fp32",
        "nin_qat",
        "nin_qat_cpu",
        "resnet20_qat",
        "resnet20_w4a8_qat",
    } <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_instantiates_without_training(composed, recipe):
    cfg = composed(f"recipe={recipe}", "init_checkpoint=unused.ckpt")
    job = {k: v for k, v in cfg.items() if k != "hydra"}
    OmegaConf.to_container(OmegaConf.create(job), resolve=True)  # every interpolation resolves
    # a bare `deploy:` in a recipe nulls the group and the run silently skips both exports
    assert cfg.deploy.integer and cfg.deploy.onnx, cfg.deploy
    check_experiment(cfg)  # every recipe passes the checks a run makes first
    model = instantiate(cfg.model)
    module = build_module(cfg)
    model = module.model
    assert isinstance(module, ImageClassifier)
    datamodule = instantiate(cfg.data)  # no download: that happens in prepare_data
    example = torch.zeros(2, datamodule.in_channels, datamodule.image_size, datamodule.image_size)
    assert model(example).shape == (2, 10)
    if cfg.quant is not None:
        callback = instantiate(cfg.qat, OmegaConf.to_container(cfg.quant))
        assert callback.config.weight_bits in (4, 8)


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (["scheduler=cosine"], "~scheduler.milestones"),  # digits_qat's multistep milestones
        (
            ["recipe=resnet20_lowbit_cpu", "scheduler=cosine"],
            "~scheduler.milestones ~scheduler.gamma",
        ),
        (["+optimizer.betas=[0.9,0.99]"], "~optimizer.betas"),  # SGD's config, Adam's key
    ],
)
def test_a_scheduler_or_optimizer_given_foreign_arguments_fails_before_training(
    composed, overrides, hint
):
    cfg = composed(*overrides, "init_checkpoint=x.ckpt")
    with pytest.raises(ValueError, match=re.escape(hint)):
        check_experiment(cfg)
    fixed = composed(*overrides, *hint.split(), "init_checkpoint=x.ckpt")
    check_experiment(fixed)
    build_module(fixed)  # the arguments left are ones the constructors take


@pytest.mark.parametrize("variant", ["sym_fold", "sym_unfold", "asym_fold", "asym_unfold"])
def test_nin_qat_variants(composed, variant):
    cfg = composed("recipe=nin_qat", f"quant={variant}")
    assert cfg.quant.symmetric == variant.startswith("sym")
    assert cfg.quant.bn_fold == variant.endswith("_fold")
    assert list(cfg.model.widths) == [192, 160, 96, 192, 192, 192, 192, 192]
    assert cfg.trainer.max_epochs == 30 and cfg.model.bn_momentum == 0.01


def test_int8_input_variant_is_sym_fold_with_a_quantized_first_input(composed):
    sym_fold = composed("recipe=nin_qat_cpu", "quant=sym_fold").quant
    cfg = composed("recipe=nin_qat_cpu", "quant=sym_fold_int8_input")
    assert cfg.quant.quantize_first_input and not sym_fold.quantize_first_input
    assert {**sym_fold, "quantize_first_input": True} == dict(cfg.quant)


def test_w4a8_recipe_has_4bit_weights(composed):
    cfg = composed("recipe=resnet20_w4a8_qat")
    assert (cfg.quant.weight_bits, cfg.quant.activation_bits) == (4, 8)
    assert cfg.qat.start_epoch == 20  # inherited from resnet20_qat


LOW_BIT = sorted(
    p.stem for p in (ROOT / "conf" / "quant").glob("w?a?*.yaml") if "fold" not in p.stem
)


@pytest.mark.parametrize("quant", LOW_BIT)
def test_low_bit_variants_keep_the_first_and_last_layers_at_8_bits(composed, quant):
    cfg = composed("recipe=resnet20_lowbit_cpu", f"quant={quant}", "init_checkpoint=x.ckpt")
    config = instantiate(cfg.qat, OmegaConf.to_container(cfg.quant)).config
    weight_bits, activation_bits = int(quant[1]), int(quant[3])
    assert (config.weight_bits, config.activation_bits) == (weight_bits, activation_bits)
    assert config.learn_scale == ("_lsq" in quant)
    assert config.residual_bits == (8 if "_res8" in quant else None)
    assert config.weight_narrow_range == (not quant.endswith("_full"))
    assert config.high_bits_damping == (not quant.endswith("_undamped"))
    assert config.symmetric and config.activation_symmetric is False
    assert config.for_layer("model.conv", first=True).weight_bits == 8
    assert config.for_layer("model.fc", last=True).activation_bits == 8
    ptq = composed("recipe=resnet20_lowbit_ptq_cpu", f"quant={quant}", "init_checkpoint=x.ckpt")
    assert ptq.ptq.method == "mse"


def test_help_lists_the_recipes(tmp_path):
    out = train("--help", cwd=tmp_path).stdout
    assert "recipe: " + ", ".join(RECIPES) in out


def test_unknown_recipe_fails_at_once_with_the_choices(tmp_path):
    result = train("recipe=nin_qta", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'recipe/nin_qta'" in result.stderr
    assert "nin_qat" in result.stderr and "digits_qat" in result.stderr


def test_mistyped_key_fails_at_once(tmp_path):
    result = train("trainer.max_epoch=3", cwd=tmp_path)
    assert result.returncode != 0 and "max_epoch" in result.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_tiny_run_writes_config_checkpoints_metrics_and_results(tmp_path):
    result = train(
        "trainer.max_epochs=3",
        "qat.start_epoch=1",
        "qat.freeze_bn_epoch=2",
        "qat.freeze_observer_epoch=2",
        "hydra.run.dir=run",
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["recipe"] == "digits_qat" and results["variant"] == "sym_fold"
    assert results["epochs"] == 3
    assert results["schedule"] == {
        "start_epoch": 1,
        "freeze_bn_epoch": 2,
        "freeze_observer_epoch": 2,
    }
    assert results["fake_quant_test_acc"] > 0.8 and results["float_test_acc"] > 0.8
    assert results["params"] > 0 and results["macs"] > results["params"]
    assert results["size_int_bytes"] < results["size_fp32_bytes"] / 3
    assert results["integer_test_images"] == results["test_images"] == 360
    assert results["integer_seconds"] > 0 and results["onnx_seconds"] > 0  # timed apart
    assert results["integer_agreement"] >= 0.99  # the integer-only export, deployed
    assert abs(results["integer_test_acc"] - results["fake_quant_test_acc"]) <= 0.01
    # the int8 ONNX export in onnxruntime, trained with a float first-layer input (as the
    # reference) and so exported: it scores what training reported
    assert results["onnx_test_images"] == 360 and results["onnx_agreement"] >= 0.99
    assert abs(results["onnx_test_acc"] - results["fake_quant_test_acc"]) <= 0.01
    assert Path(results["onnx_path"]) == run / "model.int8.onnx"
    assert results["onnx_bytes"] == (run / "model.int8.onnx").stat().st_size
    assert (run / "config_resolved.yaml").exists() and (run / ".hydra" / "config.yaml").exists()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints[-1] == "latest-epoch002.ckpt" and checkpoints[0].startswith("best-")
    for fmt, suffix in (("onnx", ".int8.onnx"), ("integer", ".integer.pt")):
        export = subprocess.run(
            [
                sys.executable,
                "-m",
                "lightning_qat.export",
                str(run / "checkpoints" / checkpoints[-1]),
                "--format",
                fmt,
                "--evaluate",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert export.returncode == 0, export.stderr[-2000:]
        assert "top-1 equal to the fake-quant model" in export.stdout
        assert (run / "checkpoints" / f"latest-epoch002{suffix}").exists()
    metrics = (run / "csv" / "metrics.csv").read_text()
    assert "qat/phase" in metrics and "val_acc" in metrics


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        # the LR drops when BN freezes, as in every recipe: at 0.02 the frozen statistics go
        # stale within the epoch and the accuracy falls from 95% to 81%
        (
            "resnet20_qat",
            [
                "trainer.max_epochs=3",
                "qat.freeze_bn_epoch=2",
                "optimizer.lr=0.02",
                "scheduler.milestones=[2]",
            ],
        ),
        # half width: it trains on the digits in 6 epochs (at 2 it still guesses: ties)
        (
            "mobilenet_v2_qat",
            ["model.width_mult=0.5", "trainer.max_epochs=6", "qat.freeze_bn_epoch=4"],
        ),
    ],
    ids=["resnet20_qat", "mobilenet_v2_qat"],
)
def test_residual_recipes_deploy_like_nin(recipe, overrides, tmp_path):
    """The residual recipes, on the bundled digits (one channel): the run writes the int8
    ONNX file and the deployed models' columns, whose top-1 is the fake-quant model's."""
    result = train(
        f"recipe={recipe}",
        "data=digits",
        "model.in_channels=1",
        *overrides,
        "qat.start_epoch=0",
        "qat.freeze_observer_epoch=${qat.freeze_bn_epoch}",
        "quant=sym_fold_int8_input",  # integer-only: both exports quantize the input
        "hydra.run.dir=run",
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # it learned (chance: 10%): the half-width MobileNet ends near 90% on the 360 test
    # digits, on an AMD EPYC at 90.00%, so a bar at 90% failed by one image there
    assert results["fake_quant_test_acc"] > 0.8
    assert "onnx_error" not in results and "integer_error" not in results
    assert Path(results["onnx_path"]) == tmp_path / "run" / "model.int8.onnx"
    for prefix in ("integer", "onnx"):
        assert results[f"{prefix}_test_images"] == 360
        assert results[f"{prefix}_agreement"] >= 0.99, results
        assert abs(results[f"{prefix}_test_acc"] - results["fake_quant_test_acc"]) <= 0.01


def test_two_job_multirun_and_report(tmp_path):
    result = train(
        "-m",
        "quant=none,asym_unfold",
        "trainer.max_epochs=2",
        "qat.start_epoch=1",
        "hydra.sweep.dir=sweep",
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert sorted(p.parent.name for p in sweep.rglob("results.json")) == ["0_none", "1_asym_unfold"]
    report = subprocess.run(
        [sys.executable, "-m", "lightning_qat.report", str(sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line for line in report.splitlines() if line.startswith("| digits_qat")]
    assert len(rows) == 2 and "| none |" in rows[0] and "| asym_unfold |" in rows[1]
    # 17 columns, the bit widths and the integer-only and ONNX int8 accuracies among them
    assert rows[1].count("|") == rows[0].count("|") == 18
    assert "| W8A8 | QAT, observers |" in rows[1] and "| FP32 | FP32 |" in rows[0]
    onnx_acc = float(rows[1].split("|")[11])
    results = json.loads(next(sweep.glob("1_*/results.json")).read_text())
    assert onnx_acc == round(100 * results["onnx_test_acc"], 2)
    for png in ("accuracy.png", "curves.png"):
        assert (sweep / png).read_bytes()[:4] == b"\x89PNG"


def test_optuna_sweep_runs_trials(tmp_path):
    result = train(
        "-m",
        "sweep=optuna",
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=1",
        "qat.start_epoch=0",
        "hydra.sweep.dir=optuna",
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "optuna").rglob("results.json"))) == 2
    best = (tmp_path / "optuna" / "optimization_results.yaml").read_text()
    assert "best_params" in best and "optimizer.lr" in best


def test_csv_tensorboard_and_offline_wandb_at_once(tmp_path):
    result = train(
        "logger=all",
        "trainer.max_epochs=1",
        "qat.start_epoch=0",
        "hydra.run.dir=run",
        *FAST,
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "csv" / "metrics.csv").exists()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, list(run.rglob("*"))[:20]
    (records,) = offline[0].glob("*.wandb")
    # per-layer statistics in a section per layer, the phase, and the two end tables
    logged = records.read_bytes()
    for key in (b"qat.model.4/act_scale", b"qat.model.4/weight_sqnr_db", b"qat/phase"):
        assert key in logged, key
    tables = {p.name.split("_")[0]: p for p in offline[0].rglob("*.table.json")}
    assert {"layers", "results"} <= set(tables), list(offline[0].rglob("*.table.json"))
    layers = json.loads(tables["layers"].read_text())
    assert [row[0] for row in layers["data"]] == ["model.0", "model.4", "model.9", "model.11"]
    assert "onnx_agreement" in tables["results"].read_text()
    # TensorBoard: the same scalars and the tables as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.*")).parent))
    events.Reload()
    assert {"qat/phase", "qat.model.4/act_scale"} <= set(events.Tags()["scalars"])
    assert {"qat/layers/text_summary", "results/text_summary"} <= set(events.Tags()["tensors"])


def test_local_parallel_launcher_runs_jobs_in_processes(tmp_path):
    result = train(
        "-m",
        "launcher=local_parallel",
        "quant=sym_fold,asym_fold",
        "trainer.max_epochs=1",
        "qat.start_epoch=0",
        "hydra.sweep.dir=parallel",
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib" in result.stdout + result.stderr
    assert len(list((tmp_path / "parallel").rglob("results.json"))) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # the default recipe converts at epoch 6: 2 epochs would train float, labelled sym_fold
        (["trainer.max_epochs=2"], "qat.start_epoch=6 is not before trainer.max_epochs=2"),
        (["+ptq.method=kl"], "ptq calibrates a trained float model: set init_checkpoint"),
        # trained to the end, then crashed in test (expected dtype BFloat16 for 'end')
        (["trainer.precision=bf16-true"], "use trainer.precision=bf16-mixed"),
        (
            ["module.distillation_weight=0.5"],
            "module.distillation_weight distills from the float model of init_checkpoint",
        ),
    ],
    ids=["conversion-never-reached", "ptq-without-checkpoint", "bf16-true", "kd-no-teacher"],
)
def test_mislabelled_runs_are_refused_before_training(overrides, message, tmp_path):
    result = train(*overrides, "hydra.run.dir=run", *FAST, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_checkpoints_are_named_before_training(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(10, 4)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    qat = tmp_path / "qat.ckpt"
    torch.save({"state_dict": {"model.conv1.weight_quantizer.scale": torch.ones(1)}}, qat)
    cases = [
        (f"resume={tmp_path / 'missing.ckpt'}", "resume=", "no such file"),
        (f"resume={truncated}", "resume=", "is not a readable checkpoint (truncated"),
        (f"init_checkpoint={garbage}", "init_checkpoint=", "is not a readable checkpoint"),
        (f"init_checkpoint={qat}", "init_checkpoint=", "is a QAT checkpoint"),
    ]
    for index, (override, option, message) in enumerate(cases):
        run = f"run{index}"
        result = train(override, f"hydra.run.dir={run}", *FAST, cwd=tmp_path)
        assert result.returncode != 0, override
        assert option in result.stderr and message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / run / "checkpoints").exists()


@pytest.fixture(scope="module")
def float_run(tmp_path_factory) -> tuple[Path, float]:
    """A 2-epoch FP32 digits run: its last checkpoint and its test accuracy."""
    root = tmp_path_factory.mktemp("fp32")
    fp32 = train("quant=none", "trainer.max_epochs=2", "hydra.run.dir=fp32", *FAST, cwd=root)
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    ckpt = next((root / "fp32" / "checkpoints").glob("latest-*.ckpt"))
    return ckpt, json.loads((root / "fp32" / "results.json").read_text())["test_acc"]


def test_ptq_run_calibrates_a_float_checkpoint_without_training(float_run, tmp_path):
    ckpt, float_acc = float_run
    result = train(
        f"init_checkpoint={ckpt}",
        "+ptq.method=kl",
        "+ptq.num_batches=4",
        "hydra.run.dir=ptq",
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "ptq" / "results.json").read_text())
    assert results["variant"] == "ptq_kl/sym_fold" and results["epochs"] == 0
    assert results["ptq"] == {"method": "kl", "num_batches": 4}
    assert results["fake_quant_test_acc"] > float_acc - 0.05


def test_a_distilled_qat_run_learns_from_its_float_checkpoint(float_run, tmp_path):
    ckpt, float_acc = float_run
    result = train(
        f"init_checkpoint={ckpt}",
        "module.distillation_weight=0.5",
        "module.distillation_temperature=2",
        "trainer.max_epochs=1",
        "qat.start_epoch=0",
        "hydra.run.dir=kd",
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "kd" / "results.json").read_text())
    assert results["distillation"] == 0.5 and method(results) == "QAT, observers + KD"
    logged = (tmp_path / "kd" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train_distillation_loss" in logged
    (checkpoint,) = (tmp_path / "kd" / "checkpoints").glob("latest-*.ckpt")
    assert set(_state(checkpoint)) > set(_state(ckpt))  # the model's keys and quantizers
    assert not any("teacher" in key for key in _state(checkpoint))
    assert results["test_acc"] > float_acc - 0.05


@pytest.mark.parametrize("quant", ["sym_fold", "none"])
def test_a_nan_in_training_stops_the_run_before_any_export(quant, tmp_path):
    """One NaN pixel: fake quantization hid it (loss 2.33, 10% test accuracy, an ONNX
    file written); now the QAT run stops like the FP32 run, naming step and layer."""
    result = train(
        "data._target_=poisoned_data.PoisonedDigitsData",
        f"quant={quant}",
        "trainer.max_epochs=1",
        "qat.start_epoch=0",
        "hydra.run.dir=run",
        *FAST,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT / "tests")},
    )
    assert result.returncode != 0
    assert "NonFiniteError: NaN/Inf at global step" in result.stderr, result.stderr[-3000:]
    assert "the batch's input holds 1 NaN/Inf value(s)" in result.stderr
    assert not (tmp_path / "run" / "model.int8.onnx").exists()
    assert not (tmp_path / "run" / "results.json").exists()


def _state(checkpoint: Path) -> dict:
    return torch.load(checkpoint, weights_only=False)["state_dict"]


def _csv_rows(run: Path) -> list[tuple]:
    text = (run / "csv" / "metrics.csv").read_text().splitlines()
    import csv

    return sorted(
        (int(row["step"]), tuple(sorted(k for k, v in row.items() if v and k != "step")))
        for row in csv.DictReader(text)
    )


def test_a_run_killed_mid_qat_resumes_to_the_uninterrupted_weights(tmp_path):
    """kill -9 at the start of epoch 8 (QAT running; the epoch-7 checkpoint written), then
    ``resume=<run>/checkpoints/latest-epoch007.ckpt``: the run continues in its own folder
    and ends on exactly the weights, metrics rows and results of a run never interrupted
    (shuffling and augmentation are a function of seed and epoch; main's app differed in
    32 tensors and scored 98.89 against 99.17)."""
    full = train("hydra.run.dir=full", *FAST, cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = train(
        "hydra.run.dir=crash",
        "+callbacks.kill._target_=kill_at_epoch.KillAtEpoch",
        "+callbacks.kill.epoch=8",
        *FAST,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT / "tests")},
    )
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    crash = tmp_path / "crash"
    assert not (crash / "results.json").exists()
    checkpoint = crash / "checkpoints" / "latest-epoch007.ckpt"
    resumed = train(f"resume={checkpoint.relative_to(tmp_path)}", *FAST, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crash", "full"]  # no new folder
    final = "latest-epoch011.ckpt"
    a, b = _state(tmp_path / "full" / "checkpoints" / final), _state(crash / "checkpoints" / final)
    assert a.keys() == b.keys()
    differ = [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])]
    assert not differ, differ
    # the best checkpoint tracked across the crash, the metrics continued, not restarted
    best = {p.name for p in (tmp_path / "full" / "checkpoints").glob("best-*")}
    assert best == {p.name for p in (crash / "checkpoints").glob("best-*")}
    assert _csv_rows(tmp_path / "full") == _csv_rows(crash)
    ra = json.loads((tmp_path / "full" / "results.json").read_text())
    rb = json.loads((crash / "results.json").read_text())
    for key in ("test_acc", "float_test_acc", "integer_test_acc", "onnx_test_acc", "epochs"):
        assert ra[key] == rb[key], key
    # the run's own config stays; the resumed run's sits beside Hydra's
    assert "resume: null" in (crash / "config_resolved.yaml").read_text()
    (resumed_config,) = (crash / ".hydra").glob("resumed-*/config_resolved.yaml")
    assert "resume: crash/checkpoints/latest-epoch007.ckpt" in resumed_config.read_text()


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    """Two processes, one folder name (as two runs started in the same second): the
    second gets ``_2``; main's runs shared the folder and crashed on the CSV logger."""
    same = ["hydra.run.dir='${lqat.run_dir:runs/same,${resume}}'", "trainer.max_epochs=1"]
    args = [*same, "qat.start_epoch=0", *FAST]
    processes = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["same", "same_2"]
    for run in runs:
        results = json.loads((tmp_path / "runs" / run / "results.json").read_text())
        assert results["output_dir"] == str(tmp_path / "runs" / run)
        assert len(list((tmp_path / "runs" / run / "checkpoints").glob("latest-*"))) == 1


def test_a_two_process_ddp_run_ends_with_one_results_file_and_one_model(tmp_path):
    """``trainer.strategy=ddp`` (a key of the trainer config now, no ``+``) on 2 CPU
    processes: main crashed in the deployment step (rank zero's fake-quant model reached
    its observers' all-reduce after the other rank had left), and wrote no results."""
    result = train(
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "qat.start_epoch=0",
        "hydra.run.dir=run",
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("results.json")] == [
        Path("run/results.json")
    ]
    assert [p.name for p in tmp_path.rglob("*.onnx")] == ["model.int8.onnx"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test_images"] == results["onnx_test_images"] == 360
    assert results["onnx_agreement"] >= 0.99 and results["integer_agreement"] >= 0.99
    assert results["fake_quant_test_acc"] > 0.5


def test_a_failed_export_keeps_the_results_measured_before_it(tmp_path):
    (tmp_path / "run" / "model.int8.onnx").mkdir(parents=True)  # the export cannot write
    result = train(
        "trainer.max_epochs=1", "qat.start_epoch=0", "hydra.run.dir=run", *FAST, cwd=tmp_path
    )
    assert result.returncode != 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["deploy_error"].startswith("IsADirectoryError"), results
    assert results["fake_quant_test_acc"] > 0.5 and "integer_test_acc" in results
    assert list((tmp_path / "run" / "checkpoints").glob("latest-*.ckpt"))
