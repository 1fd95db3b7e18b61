"""`QuantConfig`: what to quantize and how, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OBSERVERS = ("ema", "minmax")
MIN_BITS, MAX_BITS = 2, 8


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
        exclude: module names (``fnmatch`` patterns) left in float.
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

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if (
                isinstance(bits, bool)
                or not isinstance(bits, int)
                or not MIN_BITS <= bits <= MAX_BITS
            ):
                raise ValueError(
                    f"QuantConfig.{name}={bits!r} is not supported: "
                    f"use an integer from {MIN_BITS} to {MAX_BITS}"
                )
        for name in ("symmetric", "per_channel", "bn_fold", "quantize_first_input"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"QuantConfig.{name}={getattr(self, name)!r} must be True or False"
                )
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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and loggers); ``QuantConfig(**d)`` restores it."""
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d
