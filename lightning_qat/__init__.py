"""lightning-qat: quantization-aware training for PyTorch Lightning.

The public API; everything a user imports comes from here.
"""

from lightning_qat.allocator import keep_freed_memory
from lightning_qat.calibrate import calibrate
from lightning_qat.callback import QuantizationAwareTraining
from lightning_qat.checkpoint import load_qat_checkpoint, restore_qat_checkpoint
from lightning_qat.float_modules import FloatModule
from lightning_qat.nn import (
    FoldedBatchNorm2d,
    QuantConv1d,
    QuantConv2d,
    QuantConvBn1d,
    QuantConvBn2d,
    QuantConvTranspose2d,
    QuantLinear,
    QuantMultiheadAttention,
)
from lightning_qat.nonfinite import NonFiniteError
from lightning_qat.nonfinite_guard import NonFiniteGuard
from lightning_qat.prepare import (
    activation_quantizers,
    find_conv_bn_pairs,
    plan_qat,
    prepare_qat,
    quantized_layers,
    quantizer_parameters,
    quantizers,
)
from lightning_qat.quant import (
    FakeQuantize,
    LearnedScaleFakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QuantConfig,
    compute_qparams,
    quant_range,
)

__all__ = [
    "FakeQuantize",
    "FloatModule",
    "FoldedBatchNorm2d",
    "LearnedScaleFakeQuantize",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "NonFiniteError",
    "NonFiniteGuard",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvBn1d",
    "QuantConvBn2d",
    "QuantConvTranspose2d",
    "QuantLinear",
    "QuantMultiheadAttention",
    "QuantizationAwareTraining",
    "activation_quantizers",
    "calibrate",
    "compute_qparams",
    "find_conv_bn_pairs",
    "keep_freed_memory",
    "load_qat_checkpoint",
    "plan_qat",
    "prepare_qat",
    "quant_range",
    "quantized_layers",
    "quantizer_parameters",
    "quantizers",
    "restore_qat_checkpoint",
]
__version__ = "0.1.0"
