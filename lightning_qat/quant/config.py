"""`QuantConfig`: what to quantize and how, validated on construction."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

OBSERVERS = ("ema", "minmax")
SCALE_INITS = ("minmax", "mse", "lsq")
FOLDED_STEP_UNITS = ("folded", "weight")
MIN_BITS, MAX_BITS = 2, 8
#: `QuantConfig.layer_bits` patterns naming the first and the last quantized layer (in
#: call order) whatever the model calls them: the low-bit protocol keeps both at 8 bits.
FIRST_LAYER, LAST_LAYER = "@first", "@last"
_BITS_FIELDS = ("weight_bits", "activation_bits")


def _check_bits(name: str, bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"QuantConfig.{name}={bits!r} is not supported: "
            f"use an integer from {MIN_BITS} to {MAX_BITS}"
        )


@dataclass
class QuantConfig:
    """How a model is quantized.

    Attributes:
        weight_bits: bits of the weights, 2..8.
        activation_bits: bits of the activations (each quantized layer's input), 2..8.
        symmetric: ``True`` for zero point 0 and the narrow range
            ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; ``False`` for an affine range with an integer
            zero point (Jacob et al. 2018, section 2.1). Applies to weights and activations.
        per_channel: weights get one scale per output channel (axis 0) instead of one per
            tensor. Activations are always per tensor.
        bn_fold: fold BatchNorm into the preceding convolution during training
            (Krishnamoorthi 2018, section 3.2.2) instead of keeping a float BatchNorm.
        observer: activation range tracker, ``"ema"`` (exponential moving average of each
            batch's min/max) or ``"minmax"`` (min/max of the current batch only).
        ema_momentum: weight of the newest batch in the EMA, in (0, 1]; torch's default 0.01.
        quantize_first_input: fake-quantize the input of the first quantized layer. The
            reference NIN leaves it float; its range is still observed, for export.
        exclude: module names (``fnmatch`` patterns) left in float; `prepare_qat`
            refuses a pattern naming no module of the model.
        activation_symmetric: the scheme of the activations when it differs from the
            weights' (``None``: as ``symmetric``). Low-bit QAT quantizes weights
            symmetrically and activations asymmetrically: after a ReLU a symmetric signed
            grid spends half its codes on negative values that never occur (at 2 bits it
            keeps two levels, 0 and s), an asymmetric one puts all ``2^b`` levels on
            ``[0, max]`` (LSQ+, Bhalgat et al. 2020, section 3).
        learn_scale: the step sizes (and, for asymmetric activations, the zero points)
            become trainable Parameters with the gradient of LSQ (Esser et al. 2019) and
            LSQ+ (Bhalgat et al. 2020) instead of following observed ranges; see
            `lightning_qat.quant.LearnedScaleFakeQuantize`.
        scale_init: with ``learn_scale``, where a step size starts when learning begins
            without a calibrated range: ``"mse"`` (the clipping range with the least
            quantization error on the first batch / the current weights), ``"minmax"``
            (their full range) or ``"lsq"`` (``2 mean|x| / sqrt(Qp)``, Esser et al. 2019,
            section 2.1). Activation ranges calibrated before (the callback's
            ``calibration_batches``, `lightning_qat.calibrate`) are kept instead.
        high_bits_damping: with ``learn_scale``, scale LSQ's step-size gradient by
            ``2^(-1.5 (b - 4))`` above 4 bits (1/64 at 8; 2 to 4 bits are LSQ as
            published): ``True`` (default) every such step, weights and activations;
            ``"weights"`` the weight steps only; ``False`` none. On for fine-tuning from
            a trained model, where without it 8-bit per-channel weight steps run away
            and switch channels off (ResNet-20 W8A8 LSQ: 51.6% undamped, 70.5% damped);
            damping the 8-bit activation steps too (first and last inputs, residual
            path) kept ResNet-20 W2A2 steadier over three seeds (README). Off lets 5- to
            8-bit steps track weights that grow a lot, as in QAT from random weights
            (see `lightning_qat.quant.learned_fake_quantize.high_bits_damping`).
        folded_step_units: with ``learn_scale`` and ``bn_fold``, the units in which a
            folded weight's step size is learned. ``"folded"`` (default): the step of the
            folded weight ``w γ/σ_running`` as the quantizer sees it. ``"weight"``: the
            step ``s`` of ``w``; the folded weight is quantized on the grid
            ``s |γ/σ_running|`` (per output channel), so its codes ``round(w / s)`` do
            not move when the BatchNorm's statistics or ``γ`` do, and the layer trains
            as the unfolded one (LSQ on ``w``, the BatchNorm after it) while it deploys
            as folded (see `lightning_qat.nn.QuantConvBn2d`). Without ``learn_scale``
            the choice changes nothing: an observed per-channel range follows the
            folded weight every step.
        fine_bias_grid: put the int32 bias of a layer with symmetric weights below 8 bits
            on a grid ``2^(8-b)`` times finer than ``s_x s_w`` (Jacob et al. 2018, section
            2.4, gives ``s_x s_w``). The export stores the ``b``-bit weight codes times
            ``2^(8-b)`` (still ``2^b`` levels, in int8) with scale ``s_w / 2^(8-b)``: the
            int8 kernels and the int32 sums are as before (far from overflow at these
            widths) and the accumulator, with its bias, gains that resolution. At 2 bits
            ``s_x s_w`` is coarse: a folded BatchNorm's shift rounded onto it cost
            ResNet-20 W2A2 a point and more (README). The training forward rounds on the
            same grid, so the export stays bit for bit. For deploying unfolded
            BatchNorms, and folded ones never frozen (ResNet-20 W2A2: +1.25 points at
            evaluation); with a frozen folded BatchNorm W2A2 trained a point lower with
            it (README).
        oscillation_dampening: with ``learn_scale``, the weight ``λ`` of the oscillation
            dampening loss ``λ Σ (s round(w/s) - clip(w, s qmin, s qmax))²`` over every
            quantized weight, the rounded value held constant (Nagel et al. 2022,
            "Overcoming Oscillations in Quantization-Aware Training", section 4.1): it
            pulls each latent weight toward the middle of its bin, so that the STE's
            updates stop flipping it between two codes. Added in the weight quantizer's
            backward pass (no change to your loss; the gradient ``2 λ (w - w_hat)``
            inside the range); the `QuantizationAwareTraining` callback ramps it from 0
            at ``start_epoch`` to ``λ`` at the last epoch on a cosine, as the paper
            does (0.1 in its MobileNet runs). ``0`` (default): off.
        oscillation_freezing: with ``learn_scale``, the final threshold ``f_th`` of
            iterative weight freezing (Nagel et al. 2022, section 4.2), for the weights of
            layers at 2 to 4 bits: each weight's oscillation frequency (a moving average,
            momentum 0.01, of the steps at which its code moved back the way it came) is
            tracked during training, and a weight whose frequency exceeds the threshold is
            frozen on its mean code for the rest of training (its latent weight gets no
            more gradient; the export reads the frozen code). The
            `QuantizationAwareTraining` callback anneals the threshold on a cosine from
            0.1 at ``start_epoch`` down to this value at the last epoch's end, as the
            paper's MobileNet runs do (0.1 to 0.01-0.011); ``qat/frozen_weights`` logs
            the fraction frozen. A frequency below 1; ``0`` (default): off.
        layer_bits: per-layer bit widths by module name: ``{pattern: bits}`` sets both
            widths of the matching layers, ``{pattern: {"weight_bits": 8}}`` either one.
            Patterns are ``fnmatch`` patterns on module names, or ``"@first"`` and
            ``"@last"`` for the first and last quantized layer in call order (the
            low-bit protocol of every LSQ-type paper: both at 8 bits). A later pattern
            wins where several match; ``activation_bits`` is the layer's input's.
            `prepare_qat` refuses a pattern matching none of the layers it quantizes.
        residual_bits: bits of the grids on the residual path, 2..8: the values a
            residual add, a concatenation or an average pool reads (each add's two inputs
            and its output, on ResNets). ``None``: the widest width of the layers reading
            the value, else ``activation_bits``. A layer reading such a value at another
            width puts it on its own grid first (a requantization, as the integer model
            does it). LSQ (Esser et al. 2019) quantizes the inputs of the convolutions
            and linear layers only, so its residual adds run in full precision; an
            integer runtime adds on codes, so 8 bits is the deployable way to keep the
            residual path wide while the layers' inputs are 4 or 2 bits.
        weight_narrow_range: with ``symmetric`` weights, ``True`` (default) drops the most
            negative code, ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (whitepaper section 2.2: no
            ``-128 * -128`` product); ``False`` uses the full signed range ``[-2^(b-1),
            2^(b-1) - 1]`` with zero point 0, LSQ's grid for signed data (Esser et al.
            2019, section 2: ``-Qn = -2^(b-1)``). It matters at 2 bits, where the narrow
            range is ternary (-1, 0, 1) and the full one has four levels (-2 .. 1).
        strict: refuse (``ValueError`` from `prepare_qat`) a model in which modules holding
            weights would stay float other than by design (normalisations, float islands)
            or by ``exclude``: an LSTM, a Conv3d, a Parameter the model uses itself. Off,
            they are listed in a warning.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    symmetric: bool = True
    per_channel: bool = True
    bn_fold: bool = True
    observer: str = "ema"
    ema_momentum: float = 0.01
    quantize_first_input: bool = False
    exclude: tuple[str, ...] = field(default_factory=tuple)
    activation_symmetric: bool | None = None
    learn_scale: bool = False
    scale_init: str = "mse"
    high_bits_damping: bool | str = True
    folded_step_units: str = "folded"
    fine_bias_grid: bool = False
    oscillation_dampening: float = 0.0
    oscillation_freezing: float = 0.0
    layer_bits: dict[str, Any] = field(default_factory=dict)
    residual_bits: int | None = None
    weight_narrow_range: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        for name in _BITS_FIELDS:
            _check_bits(name, getattr(self, name))
        if self.residual_bits is not None:
            _check_bits("residual_bits", self.residual_bits)
        for name in (
            "symmetric",
            "per_channel",
            "bn_fold",
            "quantize_first_input",
            "learn_scale",
            "weight_narrow_range",
            "fine_bias_grid",
            "strict",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"QuantConfig.{name}={getattr(self, name)!r} must be True or False"
                )
        if self.activation_symmetric is not None and not isinstance(
            self.activation_symmetric, bool
        ):
            raise ValueError(
                f"QuantConfig.activation_symmetric={self.activation_symmetric!r} must be "
                "True, False or None (as symmetric)"
            )
        if not isinstance(self.high_bits_damping, bool) and self.high_bits_damping != "weights":
            raise ValueError(
                f"QuantConfig.high_bits_damping={self.high_bits_damping!r} must be True "
                "(every step above 4 bits), 'weights' (weight steps only) or False"
            )
        if self.scale_init not in SCALE_INITS:
            raise ValueError(
                f"QuantConfig.scale_init={self.scale_init!r} is not one of {', '.join(SCALE_INITS)}"
            )
        if self.folded_step_units not in FOLDED_STEP_UNITS:
            raise ValueError(
                f"QuantConfig.folded_step_units={self.folded_step_units!r} is not one of "
                f"{', '.join(FOLDED_STEP_UNITS)}"
            )
        # the oscillation methods (Nagel et al. 2022) act in the learned-step weight
        # quantizer; NaN fails the range check too (it would reach every weight)
        for name, upper, what in (
            ("oscillation_dampening", math.inf, "a finite number >= 0"),
            ("oscillation_freezing", 1.0, "a frequency in [0, 1) (0: off)"),
        ):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not 0 <= value < upper:
                raise ValueError(f"QuantConfig.{name}={value!r} must be {what}")
            if value and not self.learn_scale:
                raise ValueError(
                    f"QuantConfig.{name} needs learn_scale=True (it acts in the learned-step "
                    "weight quantizer)"
                )
        self.layer_bits = _checked_layer_bits(self.layer_bits)
        if self.observer not in OBSERVERS:
            raise ValueError(
                f"QuantConfig.observer={self.observer!r} is not one of {', '.join(OBSERVERS)}"
            )
        momentum = self.ema_momentum
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float)
            or not 0 < momentum <= 1
        ):
            raise ValueError(f"QuantConfig.ema_momentum={momentum!r} must be a number in (0, 1]")
        if isinstance(self.exclude, str):
            raise ValueError(
                f"QuantConfig.exclude={self.exclude!r} must be a list of module names, not a string"
            )
        self.exclude = tuple(self.exclude)
        for pattern in self.exclude:
            if not isinstance(pattern, str):
                raise ValueError(f"QuantConfig.exclude holds {pattern!r}: use module names (str)")

    @property
    def activations_symmetric(self) -> bool:
        """The activations' scheme: ``activation_symmetric``, else ``symmetric``."""
        return self.symmetric if self.activation_symmetric is None else self.activation_symmetric

    def for_layer(self, name: str, first: bool = False, last: bool = False) -> QuantConfig:
        """The config of the layer ``name`` (``first``/``last``: in call order), with its
        `layer_bits` applied; ``self`` where no pattern matches."""
        changes: dict[str, int] = {}
        for pattern, bits in self.layer_bits.items():
            if (
                (pattern == FIRST_LAYER and first)
                or (pattern == LAST_LAYER and last)
                or fnmatch.fnmatchcase(name, pattern)
            ):
                changes.update(bits)
        return replace(self, **changes, layer_bits={}) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and loggers); ``QuantConfig(**d)`` restores it."""
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["layer_bits"] = {k: dict(v) for k, v in self.layer_bits.items()}
        return d


def _checked_layer_bits(layer_bits: object) -> dict[str, dict[str, int]]:
    """``{pattern: {"weight_bits": b, "activation_bits": b}}`` from what `QuantConfig`
    accepts (a mapping of patterns to a bit width or to a mapping of the two fields)."""
    if not isinstance(layer_bits, Mapping):
        raise ValueError(
            f"QuantConfig.layer_bits={layer_bits!r} must map module-name patterns to bits, "
            'e.g. {"@first": 8, "@last": 8, "layer3.*": {"weight_bits": 4}}'
        )
    checked = {}
    for pattern, bits in layer_bits.items():
        if not isinstance(pattern, str):
            raise ValueError(f"QuantConfig.layer_bits has the key {pattern!r}: use a name pattern")
        if isinstance(bits, Mapping):
            unknown = sorted(str(k) for k in bits if k not in _BITS_FIELDS)
            if unknown:
                raise ValueError(
                    f"QuantConfig.layer_bits[{pattern!r}] has {', '.join(unknown)}: "
                    f"use {' and/or '.join(_BITS_FIELDS)}"
                )
            entry = {str(k): v for k, v in bits.items()}
        else:
            entry = dict.fromkeys(_BITS_FIELDS, bits)
        for name, value in entry.items():
            _check_bits(f"layer_bits[{pattern!r}].{name}", value)
        checked[pattern] = entry
    return checked
