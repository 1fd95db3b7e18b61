"""Quantized layers, pure torch: QuantConv2d, QuantLinear, QuantConvBn2d (BN folded)."""

from lightning_qat.nn.conv import QuantConv2d
from lightning_qat.nn.conv_bn import QuantConvBn2d
from lightning_qat.nn.folded_bn import FoldedBatchNorm2d
from lightning_qat.nn.linear import QuantLinear

QUANTIZED_LAYERS = (QuantConv2d, QuantConvBn2d, QuantLinear)

__all__ = ["QUANTIZED_LAYERS", "FoldedBatchNorm2d", "QuantConv2d", "QuantConvBn2d", "QuantLinear"]
