"""Quantized layers, pure torch: convolutions (2-d, 1-d, transposed 2-d; with BatchNorm
folded), Linear and multi-head attention."""

from torch import nn

from lightning_qat.nn.attention import (
    KeepModulePath,
    QuantMultiheadAttention,
    attention_unsupported,
    keep_module_paths,
)
from lightning_qat.nn.conv import QuantConv1d, QuantConv2d, QuantConvTranspose2d
from lightning_qat.nn.conv_bn import QuantConvBn1d, QuantConvBn2d, QuantConvBnMixin
from lightning_qat.nn.folded_bn import FoldedBatchNorm2d
from lightning_qat.nn.linear import QuantLinear
from lightning_qat.nn.relu import ReLUBeforeQuantizer

QUANTIZED_LAYERS = (
    QuantConv2d,
    QuantConvBn2d,
    QuantLinear,
    QuantConv1d,
    QuantConvBn1d,
    QuantConvTranspose2d,
    QuantMultiheadAttention,
)
#: The float module each quantized layer replaces (the first match wins: a subclass of
#: nn.Linear, such as attention's ``out_proj``, becomes a `QuantLinear`).
QUANTIZED_FORM: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: QuantConv2d,
    nn.Conv1d: QuantConv1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
    nn.MultiheadAttention: QuantMultiheadAttention,
}
#: The folded form of a convolution followed by its BatchNorm.
FOLDED_FORM: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: QuantConvBn2d,
    nn.Conv1d: QuantConvBn1d,
}

__all__ = [
    "FOLDED_FORM",
    "QUANTIZED_FORM",
    "QUANTIZED_LAYERS",
    "FoldedBatchNorm2d",
    "KeepModulePath",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvBn1d",
    "QuantConvBn2d",
    "QuantConvBnMixin",
    "QuantConvTranspose2d",
    "QuantLinear",
    "QuantMultiheadAttention",
    "ReLUBeforeQuantizer",
    "attention_unsupported",
    "keep_module_paths",
]
