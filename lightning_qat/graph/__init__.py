"""The model as a graph, pure torch.fx: where tensors are quantized (DESIGN.md section 6)."""

from lightning_qat.graph.ops import Kind, Op, PoolSpec, classify
from lightning_qat.graph.placement import Placement, TensorQuantizer, place
from lightning_qat.graph.trace import (
    INPUT_QUANTIZER,
    OUTPUT_QUANTIZER,
    QuantizeInput,
    QuantizeOutput,
    TracedModel,
    quantizes_input,
    quantizes_output,
    trace,
)

__all__ = [
    "INPUT_QUANTIZER",
    "OUTPUT_QUANTIZER",
    "Kind",
    "Op",
    "Placement",
    "PoolSpec",
    "QuantizeInput",
    "QuantizeOutput",
    "TensorQuantizer",
    "TracedModel",
    "classify",
    "place",
    "quantizes_input",
    "quantizes_output",
    "trace",
]
