"""`QuantizationAwareTraining`: the Lightning callback that schedules QAT."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn

from lightning_qat import allocator
from lightning_qat.calibrate import METHODS as CALIBRATION_METHODS
from lightning_qat.calibrate import batch_input, calibrate
from lightning_qat.dashboard import layer_metric, log_table
from lightning_qat.graph import INPUT_QUANTIZER, OUTPUT_QUANTIZER
from lightning_qat.nn import QUANTIZED_LAYERS, FoldedBatchNorm2d, QuantConvBnMixin
from lightning_qat.nonfinite_guard import NonFiniteGuard
from lightning_qat.prepare import (
    ConversionPlan,
    activation_quantizers,
    apply_plan,
    plan_qat,
    quantized_layers,
    quantizer_parameters,
    quantizers,
)
from lightning_qat.quant import LearnedScaleFakeQuantize, QuantConfig, sqnr_db, zeroed_channels

#: Phases, in order; logged as ``qat/phase`` so dashboards show when each began.
PHASES = ("float", "qat", "bn_frozen", "observers_frozen")

#: Where the freezing threshold starts (`QuantConfig.oscillation_freezing`): 0.1, as in
#: Nagel et al. 2022's MobileNet runs (annealed to 0.01-0.011 there).
FREEZING_START_THRESHOLD = 0.1

#: The name of the optimizer param group holding the learned step sizes.
QUANTIZER_GROUP = "qat/quantizer_scales"


def _check_count(
    name: str, value: int | None, allow_none: bool, unit: str = "an epoch number"
) -> None:
    """Refuse what is not a whole number >= 0 (``unit`` says what it counts)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        never = " or None (never)" if allow_none else ""
        raise ValueError(f"QuantizationAwareTraining({name}={value!r}): use {unit} >= 0{never}")


def _quant_config(config: object) -> QuantConfig:
    """A `QuantConfig` from what the callback was given: one, a mapping of its fields (a
    dict, Hydra's DictConfig) or None (the defaults). Anything else is refused here rather
    than as an AttributeError when ``fit`` converts the model."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        fields = {f.name for f in dataclasses.fields(QuantConfig)}
        unknown = sorted(str(key) for key in config if key not in fields)
        if unknown:
            raise TypeError(
                f"QuantizationAwareTraining(config=...): unknown QuantConfig field(s) "
                f"{', '.join(unknown)}; the fields are {', '.join(sorted(fields))}"
            )
        return QuantConfig(**{str(key): value for key, value in config.items()})
    raise TypeError(
        f"QuantizationAwareTraining(config={config!r}): pass a lightning_qat.QuantConfig, a "
        "mapping of its fields (e.g. {'weight_bits': 4}) or None for the defaults, not a "
        f"{type(config).__name__}"
    )


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"QuantizationAwareTraining({name}={value!r}): use True or False")


class QuantizationAwareTraining(L.Callback):
    """Quantization-aware training on a schedule, for any LightningModule unchanged.

    Epochs are 0-indexed as ``trainer.current_epoch``:

    - before ``start_epoch`` the model trains in plain FP32;
    - at the start of ``start_epoch`` it is converted in place with `prepare_qat` (the
      same Parameter objects, so the optimizer, its state and the LR scheduler carry on),
      after calibrating the activation ranges on ``calibration_batches`` training batches
      if asked;
    - from ``freeze_bn_epoch`` BatchNorm statistics stop updating (folded layers and float
      BatchNorms use the running statistics; whitepaper section 3.2.2);
    - from ``freeze_observer_epoch`` the activation scales and zero points stop changing.
      Weight ranges keep following the weights unless ``freeze_weight_ranges``: they are
      a pure function of the current weights (Jacob et al. 2018, section 3.1), the integer
      model is built from the final weights, and a frozen weight range clips weights that
      are still learning and zeroes their straight-through gradient (measured: weight
      SQNR of the digits LeNet fell from 44 to 25 dB within two epochs of freezing).

    Validation, test and predict run with fake quantization once converted; they never
    update observers or BN statistics (quantizers observe activations only in training
    mode, and eval-mode BN uses running statistics).

    Checkpoints: the callback saves its config and phase. Resuming (``fit(ckpt_path=...)``)
    from a converted checkpoint converts the model before its weights load (a
    ``load_state_dict`` pre-hook, registered in ``setup``), so every phase resumes exactly.
    For a model outside a Trainer, see `lightning_qat.load_qat_checkpoint`.

    DDP: activation ranges are reduced over the ranks at every step (identical scales on
    every rank); with ``Trainer(sync_batchnorm=True)`` the folded layers' batch statistics
    are synchronised too. Logging is on rank zero.

    Args:
        config: the quantization scheme, a `QuantConfig` or its fields as a dict.
        start_epoch: the epoch whose start converts the model.
        freeze_bn_epoch: the epoch from which BN statistics are frozen; None for never.
        freeze_observer_epoch: the epoch from which scales and zero points are frozen; None
            for never.
        calibration_batches: training batches run (no gradients, BN in eval) to initialise
            the activation ranges right after conversion; 0 lets the first QAT steps do it.
        calibration_input: picks the model input out of a batch (default: ``batch[0]`` of a
            tuple or list, else the batch).
        fuse_pairs: (conv, bn) names to fold, relative to the LightningModule, instead of
            finding them with torch.fx.
        log_layer_stats: log per quantized layer each epoch the activation scale and zero
            point, the fraction of activations clipped (sampled on the epoch's first
            batch) and the weight SQNR in dB.
        verbose: print the table of quantized layers at conversion (rank zero).
        freeze_weight_ranges: freeze the weight quantizers' ranges too at
            ``freeze_observer_epoch`` (torch.ao's ``disable_observer`` behaviour).
        on_nonfinite: what a training step whose loss, gradients or BatchNorm statistics
            hold NaN or Inf does, before the optimizer applies it (fake quantization maps
            NaN to finite codes, so without this check such a run trains on with NaN
            weights and a finite loss): ``"raise"`` stops with a `NonFiniteError` naming
            the step and the first layer at fault, ``"skip"`` drops the step and logs
            ``qat/skipped_steps``. On an accelerator the check stays on the device and
            is read at the epoch's end (no host synchronisation in a step). See
            `NonFiniteGuard`.
        export_on_fit_end: write the int8 ONNX model (`lightning_qat.export.to_onnx`) to
            this file when ``fit`` ends (a relative path is under the Trainer's
            ``default_root_dir``), on rank zero; the example input is the module's
            ``example_input_array``, else the first training batch. The path is logged
            (``qat/onnx_path``) and kept as ``exported_paths``; `export` does the same
            outside ``fit``. Lightning 1.x's ``quantize_on_fit_end``, deployable.
        export_integer: with ``export_on_fit_end``, also save the integer-only reference
            (`lightning_qat.export.to_integer`, ``torch.save``) as ``<name>.integer.pt``.
        calibration_method: how the ``calibration_batches`` set the ranges: None (the
            observers, as in training), or a `lightning_qat.calibrate` method (``"mse"``,
            ``"kl"``, ``"percentile"``, ...; weight ranges too with ``"mse"``), after
            which the observers run on (with ``QuantConfig(learn_scale=True)``: the
            learned step sizes start from these ranges).
        keep_freed_memory: when ``fit`` sets up on the CPU, tell glibc's malloc to keep
            freed memory for reuse (`lightning_qat.allocator.keep_freed_memory`):
            by default every tensor above 32 MB is a fresh mmap zero-filled on first
            touch, every step, and QAT keeps more large tensors than FP32 (README
            "Training-step overhead" times both settings). Process-wide and kept for the
            process's life; it trades resident memory for time (glibc keeps what it
            freed). ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` set by you win;
            False leaves the allocator alone. Not applied on accelerators (their
            memory has its own caching allocator).
    """

    def __init__(
        self,
        config: QuantConfig | dict[str, Any] | None = None,
        start_epoch: int = 0,
        freeze_bn_epoch: int | None = None,
        freeze_observer_epoch: int | None = None,
        calibration_batches: int = 0,
        calibration_input: Callable[[Any], Any] = batch_input,
        fuse_pairs: Sequence[tuple[str, str]] | None = None,
        log_layer_stats: bool = True,
        verbose: bool = True,
        freeze_weight_ranges: bool = False,
        on_nonfinite: str = "raise",
        export_on_fit_end: str | os.PathLike | None = None,
        export_integer: bool = False,
        calibration_method: str | None = None,
        keep_freed_memory: bool = True,
    ):
        self.config = _quant_config(config)
        _check_count("start_epoch", start_epoch, allow_none=False)
        _check_count("freeze_bn_epoch", freeze_bn_epoch, allow_none=True)
        _check_count("freeze_observer_epoch", freeze_observer_epoch, allow_none=True)
        _check_count("calibration_batches", calibration_batches, False, unit="a number of batches")
        if not callable(calibration_input):
            raise TypeError(
                f"QuantizationAwareTraining(calibration_input={calibration_input!r}): pass a "
                "function from a training batch to the model's input"
            )
        if fuse_pairs is not None and (
            isinstance(fuse_pairs, str)
            or not all(
                isinstance(pair, Sequence)
                and not isinstance(pair, str)
                and len(pair) == 2
                and all(isinstance(name, str) for name in pair)
                for pair in fuse_pairs
            )
        ):
            raise TypeError(
                f"QuantizationAwareTraining(fuse_pairs={fuse_pairs!r}): pass (conv, bn) pairs "
                "of module names, e.g. [('features.0', 'features.1')], or None to find them"
            )
        for flag, value in (
            ("log_layer_stats", log_layer_stats),
            ("verbose", verbose),
            ("freeze_weight_ranges", freeze_weight_ranges),
            ("export_integer", export_integer),
            ("keep_freed_memory", keep_freed_memory),
        ):
            _check_flag(flag, value)
        schedule = [
            (n, e)
            for n, e in (
                ("start_epoch", start_epoch),
                ("freeze_bn_epoch", freeze_bn_epoch),
                ("freeze_observer_epoch", freeze_observer_epoch),
            )
            if e is not None
        ]
        for (name_a, a), (name_b, b) in itertools.pairwise(schedule):
            if a > b:
                raise ValueError(
                    f"QuantizationAwareTraining: {name_a}={a} comes after {name_b}={b}; the "
                    "schedule must satisfy start_epoch <= freeze_bn_epoch <= "
                    f"freeze_observer_epoch: set {name_b} to {a} or later"
                )
        try:
            self.nonfinite_guard = NonFiniteGuard(on_nonfinite, calibration_input, "qat/")
        except ValueError as error:
            raise ValueError(f"QuantizationAwareTraining({error})") from None
        self.on_nonfinite = on_nonfinite
        if export_on_fit_end is not None and not isinstance(export_on_fit_end, str | os.PathLike):
            raise TypeError(
                f"QuantizationAwareTraining(export_on_fit_end={export_on_fit_end!r}): pass the "
                "path of the .onnx file to write, or None"
            )
        if export_integer and export_on_fit_end is None:
            raise ValueError(
                "QuantizationAwareTraining(export_integer=True) writes beside the ONNX file: "
                "set export_on_fit_end=<path.onnx> too"
            )
        self.export_on_fit_end = export_on_fit_end
        self.export_integer = export_integer
        #: what `export` wrote: {"onnx": path, "integer": path}
        self.exported_paths: dict[str, Path] = {}
        self.start_epoch = start_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.freeze_observer_epoch = freeze_observer_epoch
        self.calibration_batches = calibration_batches
        if calibration_method is not None and calibration_method not in CALIBRATION_METHODS:
            raise ValueError(
                f"QuantizationAwareTraining(calibration_method={calibration_method!r}): use "
                f"None (the observers) or one of {', '.join(CALIBRATION_METHODS)}"
            )
        if calibration_method is not None and calibration_batches == 0:
            raise ValueError(
                f"QuantizationAwareTraining(calibration_method={calibration_method!r}) needs "
                "calibration_batches >= 1"
            )
        self.calibration_method = calibration_method
        self.calibration_input = calibration_input
        self.fuse_pairs = None if fuse_pairs is None else [tuple(p) for p in fuse_pairs]
        self.log_layer_stats = log_layer_stats
        self.verbose = verbose
        self.freeze_weight_ranges = freeze_weight_ranges
        self.keep_freed_memory = keep_freed_memory
        self.phase = "float"
        self._plan: ConversionPlan | None = None
        self._hook_handle: Any = None
        self._clipping: dict[str, dict[str, int]] = {}
        self._calibration_pending = False
        self._trainer: L.Trainer | None = None
        self._unregistered_parameters: list[nn.Parameter] = []

    # ---------------------------------------------------------------- state
    @property
    def state_key(self) -> str:
        return "QuantizationAwareTraining"

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "start_epoch": self.start_epoch,
            "freeze_bn_epoch": self.freeze_bn_epoch,
            "freeze_observer_epoch": self.freeze_observer_epoch,
            "phase": self.phase,
            "nonfinite_guard": self.nonfinite_guard.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = QuantConfig(**state_dict["config"])
        if saved != self.config:
            raise ValueError(
                f"the checkpoint was trained with {saved} but this callback has {self.config}; "
                "resume with the checkpoint's config (the model was quantized with it)"
            )
        self.phase = state_dict["phase"]
        self.nonfinite_guard.load_state_dict(state_dict.get("nonfinite_guard", {}))

    # ---------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # for the load hook: its pruning callbacks (see _convert)
        if stage == "fit" and self.keep_freed_memory:
            self._keep_freed_memory(trainer)
        if not _is_converted(pl_module):
            # Fails now, with the reason, rather than epochs into training.
            self._plan = plan_qat(pl_module, self.config, fuse_pairs=self.fuse_pairs)
            if stage == "fit" and self.start_epoch == 0:
                # Before the strategy sets up: the optimizer is built on the quantized model,
                # and with sync_batchnorm no BatchNorm2d is left for Lightning to turn into
                # SyncBatchNorm, which DDP refuses on CPU (folded layers sync themselves).
                self._convert_for_training(pl_module)
        max_epochs = trainer.max_epochs
        if stage == "fit" and max_epochs not in (None, -1) and self.start_epoch >= max_epochs:
            warnings.warn(
                f"QuantizationAwareTraining starts at epoch {self.start_epoch} but the "
                f"Trainer stops after {max_epochs} epochs (0..{max_epochs - 1}): the model "
                "will not be quantized",
                UserWarning,
                stacklevel=2,
            )
        if self._hook_handle is None:
            self._hook_handle = pl_module.register_load_state_dict_pre_hook(
                self._convert_before_loading
            )

    @staticmethod
    def _keep_freed_memory(trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type != "cpu":
            return
        if allocator.keep_freed_memory():
            rank_zero_info(
                "QuantizationAwareTraining: glibc malloc keeps freed memory for reuse in this "
                "process (fewer fresh zero-filled pages per step; keep_freed_memory=False "
                "turns this off)"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self._trainer = None

    def _convert_before_loading(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """Makes a checkpoint and the model agree before the weights load.

        A checkpoint of a converted model converts the model first: torch runs a module's
        pre-hooks before loading its children, so the quantizers exist by the time their
        keys are read. A float checkpoint (FP32 pre-training) loaded into a model already
        converted keeps the model's fresh quantizer state, so QAT can start from it.
        """
        incoming_quantized = any(k.startswith(prefix) and is_quantizer_key(k) for k in state_dict)
        if incoming_quantized and not _is_converted(module):
            self._convert(module)
        elif not incoming_quantized and _is_converted(module):
            for key, value in module.state_dict(prefix=prefix).items():
                if is_quantizer_key(key) or key.endswith("._extra_state"):
                    state_dict.setdefault(key, value)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The optimizer exists now; a converted model's learned step sizes (converted in
        # setup, or by a resumed checkpoint) move to their own group before the
        # checkpoint's optimizer state loads, so the layout matches the run that saved it.
        self._add_quantizer_group(trainer, pl_module)

    # ---------------------------------------------------------------- schedule
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        converted = _is_converted(pl_module)
        if not converted and epoch >= self.start_epoch:
            self._convert_for_training(pl_module)
            converted = True
            self._add_quantizer_group(trainer, pl_module)
            if trainer.world_size > 1:  # created after DDP wrapped the model
                self._unregistered_parameters = quantizer_parameters(pl_module)
        if converted:
            self._configure_distributed(trainer, pl_module)
            if self._calibration_pending:
                self._calibrate(trainer, pl_module)
                self._calibration_pending = False
            self.phase = "qat"
            if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
                for layer in pl_module.modules():
                    if isinstance(layer, QuantConvBnMixin):
                        layer.freeze_bn()
                self.phase = "bn_frozen"
            if self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch:
                for _, quantizer in activation_quantizers(pl_module):
                    quantizer.enable_observer(False)
                if self.freeze_weight_ranges:
                    for _, layer in quantized_layers(pl_module):
                        layer.weight_quantizer.enable_observer(False)
                self.phase = "observers_frozen"
        self._clipping = {}
        if self.log_layer_stats and converted:
            for name, quantizer in activation_quantizers(pl_module):
                quantizer.clipping_counts = self._clipping[name] = {"clipped": 0, "total": 0}
        self._log(trainer, {"qat/phase": float(PHASES.index(self.phase))})

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning puts the model back in train mode at every epoch and after every
        # validation; frozen float BatchNorms (unfolded layers) go back to eval here.
        if self.phase in ("bn_frozen", "observers_frozen"):
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                    module.eval()
        if self.config.oscillation_dampening and self.phase != "float":
            weight = self.dampening_weight(trainer, batch_idx)
            for _, quantizer in quantizers(pl_module):
                if getattr(quantizer, "oscillation_dampening", 0.0):
                    quantizer.dampening_weight.fill_(weight)
        if self.config.oscillation_freezing and self.phase != "float":
            threshold = self.freezing_threshold(trainer, batch_idx)
            for _, quantizer in quantizers(pl_module):
                if getattr(quantizer, "oscillation_freezing", 0.0):
                    quantizer.freezing_threshold = threshold
        self.nonfinite_guard.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _training_fraction(self, trainer: L.Trainer, batch_idx: int) -> float | None:
        """The fraction of training done from ``start_epoch`` to the last epoch's end at
        this batch; ``None`` where the last epoch is not known (``max_epochs=-1``)."""
        epochs = trainer.max_epochs
        batches = trainer.num_training_batches
        if epochs in (None, -1) or epochs <= self.start_epoch or not math.isfinite(batches):
            return None
        done = trainer.current_epoch - self.start_epoch + batch_idx / max(batches, 1)
        return min(max(done / (epochs - self.start_epoch), 0.0), 1.0)

    def dampening_weight(self, trainer: L.Trainer, batch_idx: int) -> float:
        """The oscillation dampening loss's weight at this batch: ``λ (1 - cos(π t)) / 2``
        for the fraction ``t`` of training from ``start_epoch`` to the last epoch's end
        (Nagel et al. 2022, section 5: annealed from 0 on a cosine); ``λ`` throughout
        where the last epoch is not known (``max_epochs=-1``)."""
        final = float(self.config.oscillation_dampening)
        t = self._training_fraction(trainer, batch_idx)
        return final if t is None else final * (1 - math.cos(math.pi * t)) / 2

    def freezing_threshold(self, trainer: L.Trainer, batch_idx: int) -> float:
        """The oscillation frequency above which a weight freezes at this batch (iterative
        weight freezing, Nagel et al. 2022 section 4.2): annealed on a cosine from
        `FREEZING_START_THRESHOLD` at ``start_epoch`` to ``f_th``
        (`QuantConfig.oscillation_freezing`) at the last epoch's end,
        ``f_th + (f_0 - f_th) (1 + cos(π t)) / 2``; ``f_th`` throughout where the last
        epoch is not known."""
        final = float(self.config.oscillation_freezing)
        start = max(FREEZING_START_THRESHOLD, final)
        t = self._training_fraction(trainer, batch_idx)
        return final if t is None else final + (start - final) * (1 + math.cos(math.pi * t)) / 2

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self.nonfinite_guard.on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._reduce_quantizer_gradients(trainer, pl_module)
        self.nonfinite_guard.on_before_optimizer_step(trainer, pl_module, optimizer)

    def _reduce_quantizer_gradients(self, trainer: L.Trainer, pl_module: nn.Module) -> None:
        """Learned step sizes under DDP: average the gradients DDP does not know of
        (quantizers created after it wrapped the model), and drop the zero gradients of
        frozen ones (given only because DDP expects a gradient for each of its
        Parameters) so that no optimizer moves them by momentum or weight decay."""
        if not self.config.learn_scale:  # nothing to do, every step: skip the module walk
            return
        if trainer.world_size > 1 and self._unregistered_parameters:
            for parameter in self._unregistered_parameters:
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad.div_(trainer.world_size)
        for _, quantizer in quantizers(pl_module):
            if isinstance(quantizer, LearnedScaleFakeQuantize) and not quantizer.observer_enabled:
                for parameter in quantizer.parameters(recurse=False):
                    parameter.grad = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.nonfinite_guard.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Clipping is sampled on the epoch's first batch: counting costs a pass.
        if self._clipping:
            for _, quantizer in activation_quantizers(pl_module):
                quantizer.clipping_counts = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.nonfinite_guard.on_train_epoch_end(trainer, pl_module)
        # the phase at the epoch's last step too: dashboards draw it as a step chart
        metrics = {"qat/phase": float(PHASES.index(self.phase))}
        if self.config.learn_scale and _is_converted(pl_module):
            metrics["qat/zeroed_weight_channels"] = float(self._count_zeroed_channels(pl_module))
        if self.config.oscillation_freezing and _is_converted(pl_module):
            frozen = _frozen_weights(pl_module)
            if frozen is not None:
                metrics["qat/frozen_weights"] = frozen
        if self.log_layer_stats and _is_converted(pl_module):
            metrics.update(self._layer_statistics(pl_module))
        # at the epoch's last step, as Lightning logs epoch-end metrics: a run resumed from
        # this epoch's checkpoint logs from the next step on, and nothing is doubled
        self._log(trainer, metrics, step=max(trainer.global_step - 1, 0))

    def _count_zeroed_channels(self, pl_module: nn.Module) -> int:
        """Weight channels whose learned step has outgrown their weights: every code 0, so
        the channel is off, and with no code left its step's gradient all but vanishes.
        A few is LSQ switching channels off; many is the runaway of 8-bit weight steps
        (ResNet-20 W8A8: 104 of 794 channels, 20 points lost; README)."""
        count = 0
        for _, layer in quantized_layers(pl_module):
            quantizer = layer.weight_quantizer
            if not isinstance(quantizer, LearnedScaleFakeQuantize) or not quantizer.learning:
                continue
            count += len(zeroed_channels(*_weights_as_quantized(layer)))
        return count

    def _layer_statistics(self, pl_module: nn.Module) -> dict[str, float]:
        """Per layer, as ``qat.<layer>/<stat>`` (one dashboard section a layer): the input
        quantizer's scale and zero point, the fraction clipped (sampled on the epoch's
        first batch), the weight SQNR in dB; standalone quantizers under their names."""
        metrics: dict[str, float] = {}
        for name, act in activation_quantizers(pl_module):
            # a layer's own input quantizer is logged under the layer's name
            key = name.removesuffix(".activation_quantizer")
            if act.fake_quant_enabled:
                metrics[layer_metric(key, "act_scale")] = float(act.scale.detach())
                metrics[layer_metric(key, "act_zero_point")] = float(act.zero_point)
                counts = self._clipping.get(name)
                if counts and counts["total"]:
                    clipped = float(counts["clipped"])  # a device tensor: read once an epoch
                    metrics[layer_metric(key, "act_clipped")] = clipped / counts["total"]
            act.observer.warn_if_nonfinite()
        for name, layer in quantized_layers(pl_module):
            metrics[layer_metric(name, "weight_sqnr_db")] = sqnr_db(*_weights_as_quantized(layer))
        return metrics

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.log_layer_stats and _is_converted(pl_module):
            columns, rows = self._layer_rows(pl_module)
            stats = self._layer_statistics(pl_module)
            columns = (*columns, "act_scale", "weight_sqnr_db")
            rows = [
                (
                    *row,
                    stats.get(layer_metric(row[0], "act_scale")),  # None: a float input
                    stats.get(layer_metric(row[0], "weight_sqnr_db")),
                )
                for row in rows
            ]
            log_table(trainer.loggers, "qat/layers", columns, rows, step=trainer.global_step)
        if self.export_on_fit_end is None or not trainer.is_global_zero:
            return
        if not _is_converted(pl_module):
            warnings.warn(
                f"QuantizationAwareTraining: fit ended before start_epoch={self.start_epoch}; "
                f"the model is float, so {self.export_on_fit_end} was not written",
                UserWarning,
                stacklevel=2,
            )
            return
        path = Path(self.export_on_fit_end)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        self.export(pl_module, path, self._example_input(trainer, pl_module))
        rank_zero_info(f"lightning-qat: wrote {', '.join(map(str, self.exported_paths.values()))}")
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {f"qat/{k}_path": str(v) for k, v in self.exported_paths.items()}
            )

    def export(
        self, pl_module: nn.Module, path: str | os.PathLike, example_input: torch.Tensor
    ) -> Path:
        """Write the int8 ONNX model of the converted ``pl_module`` to ``path`` (and the
        integer reference beside it with ``export_integer``); returns the ONNX path. No
        collectives: it runs on one process."""
        from lightning_qat.export import to_integer, to_onnx  # onnx only when exporting

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        example = example_input[:1].to(next(pl_module.parameters()).device)
        self.exported_paths = {"onnx": to_onnx(pl_module, path, example)}
        if self.export_integer:
            stem = path.name.removesuffix(".onnx").removesuffix(".int8")  # model.int8.onnx
            integer_path = path.with_name(f"{stem}.integer.pt")
            torch.save(to_integer(pl_module), integer_path)
            self.exported_paths["integer"] = integer_path
        return self.exported_paths["onnx"]

    def _example_input(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        example = pl_module.example_input_array
        if example is None:
            loader = trainer.train_dataloader
            if loader is None:
                raise ValueError(
                    "export_on_fit_end needs an example input: set the module's "
                    "example_input_array (no training batch to take one from)"
                )
            example = self.calibration_input(next(iter(loader)))
        if not isinstance(example, torch.Tensor):
            raise TypeError(
                "export_on_fit_end exports single-input models: the example input is a "
                f"{type(example).__name__}; set example_input_array to one tensor"
            )
        return example

    # ---------------------------------------------------------------- work
    def _convert_for_training(self, module: nn.Module) -> None:
        self._convert(module)
        self._calibration_pending = self.calibration_batches > 0
        if self.verbose:
            self._print_layers(module)

    def _convert(self, module: nn.Module) -> None:
        # The plan made at set-up: the model is not traced (and warned about) twice.
        plan = self._plan or plan_qat(module, self.config, fuse_pairs=self.fuse_pairs)
        before = dict(module.named_modules())
        apply_plan(module, self.config, plan)
        self.phase = "qat"
        replaced = {
            id(old): new
            for name, new in module.named_modules()
            if (old := before.get(name)) is not None and old is not new
        }
        if self._trainer is not None:
            _retarget_pruning(self._trainer, replaced)

    def _add_quantizer_group(self, trainer: L.Trainer, pl_module: nn.Module) -> None:
        """Put the learned step sizes and zero points (`QuantConfig.learn_scale`) in a
        param group of their own in the first optimizer, named ``QUANTIZER_GROUP``: with
        group 0's settings (learning rate and its schedule) but no weight decay, which
        would pull step sizes towards 0 (LSQ trains them as any weight, but decay on a
        step size shrinks the clipping range regardless of the loss). Created at
        conversion, they are not in an optimizer the user built earlier; converted in
        ``setup``, they are, and move here, so every run has the same layout."""
        parameters = quantizer_parameters(pl_module)
        if not parameters or not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        ids = {id(p) for p in parameters}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        groups = [g for g in optimizer.param_groups if g.get("name") == QUANTIZER_GROUP]
        if groups:
            groups[0]["params"] = parameters
            return
        settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        if "weight_decay" in settings:
            settings["weight_decay"] = 0.0
        optimizer.add_param_group({**settings, "params": parameters, "name": QUANTIZER_GROUP})
        for scheduler_config in trainer.lr_scheduler_configs:
            scheduler = scheduler_config.scheduler
            if getattr(scheduler, "optimizer", None) is optimizer:
                if hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs.append(settings.get("initial_lr", settings["lr"]))
                if hasattr(scheduler, "_last_lr"):
                    scheduler._last_lr.append(settings["lr"])

    def _configure_distributed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        distributed = trainer.world_size > 1
        # Lightning keeps its sync_batchnorm choice on the strategy as a "layer sync".
        sync_bn = distributed and getattr(trainer.strategy, "_layer_sync", None) is not None
        for _, quantizer in quantizers(pl_module):
            quantizer.observer.sync = distributed
        for module in pl_module.modules():
            if isinstance(module, FoldedBatchNorm2d):
                module.sync = sync_bn or module.sync

    @torch.no_grad()
    def _calibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run training batches through the model to set the activation ranges: the model
        in eval (BN statistics untouched), its activation quantizers in training mode."""
        was_training = pl_module.training
        loader = trainer.train_dataloader
        if self.calibration_method is not None:
            batches = (trainer.strategy.batch_to_device(b) for b in loader)
            calibrate(
                pl_module,
                batches,
                self.calibration_method,
                self.calibration_batches,
                model_input=self.calibration_input,
            )
            for _, quantizer in quantizers(pl_module):  # training goes on from here
                if trainer.world_size > 1:  # each rank calibrated on its own batches
                    bounds = torch.stack([quantizer.observer.min_val, quantizer.observer.max_val])
                    torch.distributed.all_reduce(bounds)
                    bounds /= trainer.world_size
                    quantizer.observer.min_val.copy_(bounds[0])
                    quantizer.observer.max_val.copy_(bounds[1])
                    quantizer.update_qparams()
                quantizer.enable_observer(True)
            pl_module.train(was_training)
            return
        pl_module.eval()
        for _, quantizer in activation_quantizers(pl_module):
            quantizer.train()
        for index, batch in enumerate(loader):
            if index >= self.calibration_batches:
                break
            batch = trainer.strategy.batch_to_device(batch)
            pl_module(self.calibration_input(batch))
        pl_module.train(was_training)

    @rank_zero_only
    def _print_layers(self, pl_module: nn.Module) -> None:
        columns, rows = self._layer_rows(pl_module)
        print_table(f"lightning-qat: quantized layers ({self.config})", columns, rows)

    def _layer_rows(self, pl_module: nn.Module) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        rows = []
        for name, layer in quantized_layers(pl_module):
            w, a = layer.weight_quantizer, layer.activation_quantizer
            rows.append(
                (
                    name,
                    type(layer).__name__,
                    "folded" if isinstance(layer, QuantConvBnMixin) else "-",
                    f"int{w.bits} {'per-channel' if w.per_channel else 'per-tensor'}{_lsq(w)}",
                    f"int{a.bits}{_lsq(a)}" if a.fake_quant_enabled else "float (observed)",
                    "symmetric" if w.symmetric else "asymmetric",
                )
            )
        placement = self._plan.placement if self._plan is not None else None
        for point in placement.tensor_quantizers if placement else []:
            name = f"{point.module}.{INPUT_QUANTIZER if point.on_input else OUTPUT_QUANTIZER}"
            quantizer = pl_module.get_submodule(name)
            rows.append(
                (
                    name,
                    "tensor quantizer",
                    "-",
                    "-",
                    f"int{quantizer.bits}",
                    "read by " + ", ".join(point.readers),
                )
            )
        for module in self._plan.left_float if self._plan is not None else []:
            name = module.name or type(pl_module).__name__
            rows.append((name, module.kind, "-", "float", "float", module.reason))
        return ("layer", "kind", "BN", "weight", "activation", "scheme"), rows

    def _log(self, trainer: L.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
        if not trainer.is_global_zero or not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step if step is None else step)
            logger.save()  # written now: a crash after this epoch keeps its statistics


def _retarget_pruning(trainer: L.Trainer, replaced: dict[int, nn.Module]) -> None:
    """Point Lightning's `ModelPruning` callbacks at the quantized layers that replaced the
    float modules they collected in their ``setup``: they would go on pruning the orphaned
    float modules, and the trained model would stay dense (the failure Lightning cited
    when it removed its QAT callback). The quantized layers adopted the masks already
    applied (`lightning_qat.nn.pruning`)."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelPruning) and callback._parameters_to_prune:
            callback._parameters_to_prune = [
                (replaced.get(id(module), module), name)
                for module, name in callback._parameters_to_prune
            ]


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table on the console: with rich where it is installed (the app has it), plain
    text otherwise (a library install needs only torch, lightning and torchmetrics)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)) for c in column) for column in zip(columns, *rows, strict=True)]
        lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        print("\n".join(lines))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _lsq(quantizer: nn.Module) -> str:
    return ", learned step" if isinstance(quantizer, LearnedScaleFakeQuantize) else ""


def is_quantizer_key(key: str) -> bool:
    """Whether a state_dict key belongs to a quantizer (a converted model's extra state):
    every quantizer is registered under a name ending in ``quantizer``
    (``activation_quantizer``, ``output_quantizer``, an attention's ``key_quantizer``)."""
    return any(part.endswith("quantizer") for part in key.split(".")[:-1])


@torch.no_grad()
def _weights_as_quantized(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's weight as its quantizer sees it (folded under BN folding) and that weight
    fake-quantized on the scales in use (the observer paused: measuring moves nothing)."""
    weight, quantizer = layer.weight_to_quantize(), layer.weight_quantizer
    was_observing = quantizer.observer_enabled
    quantizer.enable_observer(False)
    quantized = quantizer(weight)
    quantizer.enable_observer(was_observing)
    return weight, quantized


def _is_converted(module: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED_LAYERS) for m in module.modules())


def _frozen_weights(pl_module: nn.Module) -> float | None:
    """The fraction of the tracked weights frozen by iterative weight freezing (the
    weights of the 2- to 4-bit layers), ``None`` before any was tracked."""
    frozen = total = 0
    for _, layer in quantized_layers(pl_module):
        quantizer = layer.weight_quantizer
        if getattr(quantizer, "oscillation_freezing", 0.0) and quantizer.frozen.numel():
            frozen += int(quantizer.frozen.sum())
            total += quantizer.frozen.numel()
    return frozen / total if total else None
