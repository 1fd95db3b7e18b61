"""Deployment: the integer-only reference model."""

from lightning_qat.export.fixed_point import quantize_multiplier, requantize
from lightning_qat.export.integer import IntegerModel, evaluate_integer, to_integer

__all__ = ["IntegerModel", "evaluate_integer", "quantize_multiplier", "requantize", "to_integer"]
