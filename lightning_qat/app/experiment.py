"""One experiment from a composed Hydra config: build, fit, test, write ``results.json``."""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lightning_qat.app.module import ImageClassifier
from lightning_qat.app.run_folder import resumed_run_dir, truncate_metrics
from lightning_qat.calibrate import calibrate
from lightning_qat.callback import is_quantizer_key
from lightning_qat.dashboard import log_table
from lightning_qat.export import OnnxRuntimeModel, evaluate_deployment, to_integer, to_onnx
from lightning_qat.model_stats import count_macs, model_size_bytes
from lightning_qat.nonfinite_guard import NonFiniteGuard
from lightning_qat.prepare import prepare_qat, quantizer_parameters, quantizers
from lightning_qat.quant import QuantConfig


def register_recipes(directory: str | Path) -> None:
    """Make each ``recipes/NAME.yaml`` selectable as ``recipe=NAME`` (a config group
    kept outside ``conf/``, where experiments are easy to find)."""
    store = ConfigStore.instance()
    for path in sorted(Path(directory).glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def _loggers(cfg: DictConfig, tags: list[str], group: str | None) -> list:
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None:
            continue
        if name == "wandb":
            config = OmegaConf.to_container(cfg, resolve=True)
            # a partial: instantiate() has its own parameter named config
            build = instantiate(logger_cfg, _partial_=True)
            loggers.append(build(tags=tags, group=group, config=config))
        else:
            loggers.append(instantiate(logger_cfg))
    return loggers


def _set_fake_quant(module: torch.nn.Module, enabled: bool) -> list[bool]:
    states = []
    for _, quantizer in quantizers(module):
        states.append(quantizer.fake_quant_enabled)
        quantizer.enable_fake_quant(enabled)
    return states


@torch.no_grad()
def _deployment_results(
    module: ImageClassifier,
    datamodule,
    deploy: DictConfig,
    example: torch.Tensor,
    out_dir: Path,
    results: dict[str, Any],
) -> None:
    """Accuracy of the deployed models and their top-1 agreement with the fake-quant model:
    the integer-only reference (``deploy.integer``; on the first
    ``deploy.integer_test_batches`` test batches if set, else all) and the ONNX int8 export
    in onnxruntime (``deploy.onnx``; written to ``model.int8.onnx`` in the run directory).
    A model the deployment cannot express gets ``integer_error``/``onnx_error`` instead.
    Written into ``results`` as measured, so a later failure keeps what came before."""
    model = module.model.eval()
    if deploy.integer:
        try:
            integer = to_integer(model)
        except ValueError as err:  # a model the integer reference cannot run (named op)
            results["integer_error"] = str(err)
        else:
            loader = datamodule.test_dataloader()
            results.update(
                evaluate_deployment(integer, module, loader, "integer", deploy.integer_test_batches)
            )
    if deploy.onnx:
        try:
            path = to_onnx(model, out_dir / "model.int8.onnx", example)
        except ValueError as err:
            results["onnx_error"] = str(err)
        else:
            results["onnx_path"] = str(path)
            results["onnx_bytes"] = path.stat().st_size
            loader = datamodule.test_dataloader()
            results.update(evaluate_deployment(OnnxRuntimeModel(path), module, loader, "onnx"))


def build_module(cfg: DictConfig) -> ImageClassifier:
    """The LightningModule of ``cfg``: its model, optimizer and LR schedule."""
    return instantiate(
        cfg.module,
        model=instantiate(cfg.model),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
    )


def check_experiment(cfg: DictConfig) -> None:
    """Refuse, before any data is read, configs whose results would be mislabelled or
    that would crash after training: a QAT variant whose conversion epoch is never reached
    (it would train FP32 only, and the row would still be called by its variant), PTQ
    without a trained float checkpoint (it would calibrate a random model), distillation
    without one (no teacher), a QAT run in true half precision, and an optimizer or LR
    schedule given arguments it does not take (a recipe's ``scheduler.milestones`` kept
    when ``scheduler=cosine`` is chosen on the command line)."""
    for group in ("optimizer", "scheduler"):
        check_arguments(cfg.get(group), group)
    ptq = cfg.get("ptq")
    if ptq is not None and cfg.quant is None:
        raise ValueError("ptq needs a quantization scheme: set quant=sym_fold (or another)")
    if ptq is not None and not cfg.get("init_checkpoint"):
        raise ValueError(
            "ptq calibrates a trained float model: set init_checkpoint=<a float checkpoint> "
            "(without it the random initial weights would be quantized)"
        )
    if (cfg.module.get("distillation_weight") or 0) > 0 and not cfg.get("init_checkpoint"):
        raise ValueError(
            "module.distillation_weight distills from the float model of init_checkpoint: "
            "set init_checkpoint=<a trained float checkpoint> (a random teacher teaches "
            "nothing)"
        )
    precision = str(cfg.trainer.get("precision") or "32-true")
    if cfg.quant is not None and precision in ("bf16-true", "bf16", "16-true", "16", "half"):
        # the whole model in half precision: the quantizers' scales and codes would be
        # bf16/fp16 too (8-bit codes are not exact there); autocast keeps them float32
        raise ValueError(
            f"trainer.precision={precision} casts the quantizers to half precision; QAT "
            "needs them in float32: use trainer.precision=bf16-mixed (or 16-mixed)"
        )
    max_epochs = cfg.trainer.get("max_epochs")
    bounded = max_epochs is not None and max_epochs >= 0  # None, -1: Lightning's own limits
    if cfg.quant is not None and ptq is None and bounded and cfg.qat.start_epoch >= max_epochs:
        raise ValueError(
            f"qat.start_epoch={cfg.qat.start_epoch} is not before "
            f"trainer.max_epochs={max_epochs}: the run would train in float only and "
            "be reported as a quantized variant; lower qat.start_epoch, raise "
            "trainer.max_epochs, or use quant=none for a float run"
        )


def check_arguments(node: DictConfig | None, group: str) -> None:
    """Refuse keys of the config ``group`` that its ``_target_`` does not take: Hydra merges
    a recipe's settings of one choice (multistep's ``milestones``) into another chosen on
    the command line (``scheduler=cosine``), and the constructor would only fail after the
    data and the model are set up."""
    if not node or "_target_" not in node:
        return
    target = get_method(node._target_)
    parameters = inspect.signature(target).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    names = {p.name for p in parameters}
    unknown = [key for key in node if not key.startswith("_") and key not in names]
    if unknown:
        raise ValueError(
            f"{group}: {node._target_} takes no {', '.join(unknown)} (set by the recipe "
            f"for another {group}?): drop "
            + ("it" if len(unknown) == 1 else "them")
            + " with "
            + " ".join(f"~{group}.{key}" for key in unknown)
            + f"; it takes {', '.join(sorted(names - {'params', 'optimizer'}))}"
        )


def read_checkpoint(path: str, option: str) -> dict[str, Any]:
    """Load the Lightning checkpoint that the ``option`` key (``init_checkpoint``,
    ``resume``) names, or say what is wrong with it before any training: missing,
    unreadable (truncated, not a torch file), or not a Lightning checkpoint."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{option}={path}: no such file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many kinds for a bad file
        raise ValueError(
            f"{option}={path} is not a readable checkpoint (truncated by a crash, or not "
            f"written by torch.save): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{option}={path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def load_float_weights(module: ImageClassifier, path: str) -> None:
    """``init_checkpoint``: a float (FP32) model's weights, before any conversion."""
    state = read_checkpoint(path, "init_checkpoint")["state_dict"]
    if any(is_quantizer_key(key) for key in state):
        raise ValueError(
            f"init_checkpoint={path} is a QAT checkpoint (it holds quantizer state): "
            "init_checkpoint starts from float weights; continue that run with "
            "resume=<it>, or start from the float checkpoint it was trained from"
        )
    module.load_state_dict(state)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test the experiment of ``cfg``; returns (and writes) its results."""
    start = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    variant = hydra_cfg.runtime.choices.get("quant", "none")
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir).name if multirun else None
    check_experiment(cfg)
    resumed_here = False
    if cfg.get("resume"):
        resumed = read_checkpoint(cfg.resume, "resume")  # a clear error now, not after set-up
        run_of_checkpoint = resumed_run_dir(cfg.resume)
        resumed_here = run_of_checkpoint is not None and (
            run_of_checkpoint.resolve() == output_dir.resolve()
        )
        if resumed_here:  # the crashed run's rows after its checkpoint are logged again
            truncate_metrics(output_dir / "csv" / "metrics.csv", resumed["global_step"])
    L.seed_everything(cfg.seed, workers=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    if resumed_here:  # the run's own config stays; the resumed one goes beside Hydra's
        (output_dir / hydra_cfg.output_subdir / "config_resolved.yaml").write_text(resolved)
    else:
        (output_dir / "config_resolved.yaml").write_text(resolved)

    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    ptq = cfg.get("ptq")
    if cfg.init_checkpoint:
        load_float_weights(module, cfg.init_checkpoint)
    if module.distillation_weight > 0 and ptq is None:
        # the float model as loaded: the fine-tuned one learns from it
        module.set_teacher(copy.deepcopy(module.model))
    example = torch.zeros(1, datamodule.in_channels, datamodule.image_size, datamodule.image_size)
    macs = count_macs(module.model, example)
    fp32_bytes = model_size_bytes(module.model)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if cfg.quant is not None and ptq is None:
        # positional: instantiate() itself has a parameter named config
        qat_config = OmegaConf.to_container(cfg.quant)
        callbacks.append(instantiate(cfg.qat, qat_config, on_nonfinite=cfg.on_nonfinite))
    elif ptq is None:  # FP32 training stops (or skips) on NaN exactly as QAT does
        callbacks.append(NonFiniteGuard(cfg.on_nonfinite))
    if ptq is not None:
        variant = f"ptq_{ptq.method}/{variant}"
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=_loggers(cfg, [cfg.name, variant], group) or False,
    )
    if ptq is None:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)
    else:  # post-training quantization: calibrate the trained float model, no training
        prepare_qat(module.model, QuantConfig(**OmegaConf.to_container(cfg.quant)))
        datamodule.prepare_data()
        datamodule.setup("fit")
        calibrate(module.model, datamodule.train_dataloader(), ptq.method, ptq.num_batches)
    tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    results: dict[str, Any] = {
        "recipe": cfg.name,
        "variant": variant,
        "seed": cfg.get("seed"),
        "quant": OmegaConf.to_container(cfg.quant) if cfg.quant is not None else None,
        "schedule": {
            k: cfg.qat[k] for k in ("start_epoch", "freeze_bn_epoch", "freeze_observer_epoch")
        }
        if cfg.quant is not None and ptq is None
        else None,
        "ptq": OmegaConf.to_container(ptq) if ptq is not None else None,
        "epochs": trainer.current_epoch,
        "test_acc": tested["test_acc"],
        "test_images": len(datamodule.test_set),
        # the model's weights: learned step sizes (learn_scale) are not counted
        "params": sum(p.numel() for p in module.model.parameters())
        - sum(p.numel() for p in quantizer_parameters(module.model)),
        "macs": macs,
        "size_fp32_bytes": fp32_bytes,
        # the distillation weight, where a teacher taught this run
        "distillation": module.distillation_weight if module.teacher is not None else None,
    }
    if cfg.quant is not None:
        results["fake_quant_test_acc"] = tested["test_acc"]
        saved = _set_fake_quant(module, False)  # the same weights, in float
        results["float_test_acc"] = trainer.test(module, datamodule=datamodule, verbose=False)[0][
            "test_acc"
        ]
        for (_, quantizer), enabled in zip(quantizers(module), saved, strict=True):
            quantizer.enable_fake_quant(enabled)
        results["size_int_bytes"] = model_size_bytes(module.model, quantized=True)
        if cfg.get("deploy") and trainer.is_global_zero:  # one rank writes the exports
            for _, quantizer in quantizers(module):
                # rank zero alone runs the fake-quant model from here: an all-reduce of
                # its weight ranges would wait for ranks that have left
                quantizer.observer.sync = False
            try:
                _deployment_results(module, datamodule, cfg.deploy, example, output_dir, results)
            except Exception as error:
                # a failed export after hours of training keeps what was measured
                results["deploy_error"] = f"{type(error).__name__}: {error}"
                _write_results(results, start, output_dir)
                raise
    else:
        results["float_test_acc"] = tested["test_acc"]
    if trainer.is_global_zero:
        _write_results(results, start, output_dir)
        _print_summary(results)
        # one type a column (W&B): the values as text, numbers to 6 significant digits
        rows = [
            (k, f"{v:.6g}" if isinstance(v, float) else str(v))
            for k, v in results.items()
            if isinstance(v, int | float | str)
        ]
        log_table(trainer.loggers, "results", ("metric", "value"), rows, trainer.global_step)
    return results


def _write_results(results: dict[str, Any], start: float, output_dir: Path) -> None:
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    results["output_dir"] = str(output_dir)
    tmp = output_dir / f".results.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(output_dir / "results.json")  # never a half-written file


def _print_summary(results: dict[str, Any]) -> None:
    table = Table(title=f"{results['recipe']} / {results['variant']}: test accuracy")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    rows = [
        ("as trained (fake-quant)" if results["quant"] else "FP32", "test_acc"),
        ("same weights in float", "float_test_acc" if results["quant"] else None),
        ("integer-only export", "integer_test_acc"),
        ("integer top-1 = fake-quant top-1", "integer_agreement"),
        ("ONNX int8 in onnxruntime", "onnx_test_acc"),
        ("ONNX top-1 = fake-quant top-1", "onnx_agreement"),
    ]
    for label, key in rows:
        if key and key in results:
            table.add_row(label, f"{100 * results[key]:.2f}%")
    Console().print(table)
    Console().print(f"results: {results['output_dir']}/results.json")
