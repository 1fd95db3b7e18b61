"""Deployment: the integer-only reference model and the ONNX int8 export.

`to_onnx` needs ``onnx`` and `OnnxRuntimeModel` needs ``onnxruntime``
(``pip install lightning-qat[export]``); both are imported when first used, so the
integer reference and the deployment plan work without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_qat.export.fixed_point import quantize_multiplier, requantize
from lightning_qat.export.integer import IntegerModel, to_integer
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


def __getattr__(name: str) -> Any:
    if name == "to_onnx":  # imports onnx: only when exporting
        return importlib.import_module("lightning_qat.export.onnx_export").to_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
