"""Deployment: the integer-only reference model and the ONNX int8 export."""

from lightning_qat.export.fixed_point import quantize_multiplier, requantize
from lightning_qat.export.integer import IntegerModel, to_integer
from lightning_qat.export.onnx_export import to_onnx
from lightning_qat.export.plan import DeploymentPlan, plan_deployment
from lightning_qat.export.runtime import OnnxRuntimeModel, evaluate_deployment

__all__ = [
    "DeploymentPlan",
    "IntegerModel",
    "OnnxRuntimeModel",
    "evaluate_deployment",
    "plan_deployment",
    "quantize_multiplier",
    "requantize",
    "to_integer",
    "to_onnx",
]
