"""Deployment: the integer-only reference model."""

from lightning_qat.export.fixed_point import quantize_multiplier, requantize
from lightning_qat.export.integer import IntegerModel, to_integer

__all__ = ["IntegerModel", "quantize_multiplier", "requantize", "to_integer"]
