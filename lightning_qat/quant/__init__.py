"""Quantization numerics, pure torch: config, formulas, observers, fake quantizers."""

from lightning_qat.quant.bias import bias_codes, quantize_bias
from lightning_qat.quant.config import QuantConfig
from lightning_qat.quant.fake_quantize import FakeQuantize
from lightning_qat.quant.learned_fake_quantize import LearnedScaleFakeQuantize
from lightning_qat.quant.metrics import sqnr_db, zeroed_channels
from lightning_qat.quant.observer import MinMaxObserver, MovingAverageMinMaxObserver
from lightning_qat.quant.qparams import MIN_SCALE, compute_qparams, quant_range

__all__ = [
    "MIN_SCALE",
    "FakeQuantize",
    "LearnedScaleFakeQuantize",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "QuantConfig",
    "bias_codes",
    "compute_qparams",
    "quant_range",
    "quantize_bias",
    "sqnr_db",
    "zeroed_channels",
]
