"""A vision transformer deployed (issue 14): onnxruntime runs every projection and both
attention matmuls on integer kernels, LayerNorm, softmax and GELU stay float islands, and
the integer reference and the ONNX file compute the fake-quant model's logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_export_graphs import assert_deploys_the_fake_quant_logits, optimized_ops
from torch import nn

from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.app.models import vit_tiny
from lightning_qat.export import to_integer, to_onnx

DEPTH = 2
#: onnxruntime's float kernels for what must run on integers here (the residual adds
#: feed a LayerNorm: float islands by design, as in every int8 transformer runtime)
FLOAT_MATMULS = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def _prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorms and the position embedding are named
        return prepare_qat(model, config)


@pytest.fixture(scope="module", params=[True, False], ids=["symmetric", "asymmetric"])
def observed_vit(request):
    torch.manual_seed(0)
    config = QuantConfig(symmetric=request.param, quantize_first_input=True)
    model = _prepare(vit_tiny(width=32, depth=DEPTH, heads=2), config).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


def test_the_integer_reference_and_onnx_compute_the_fake_quant_logits(observed_vit, tmp_path):
    torch.manual_seed(1)
    assert_deploys_the_fake_quant_logits(observed_vit, torch.randn(16, 3, 32, 32), tmp_path)


def test_onnxruntime_runs_projections_and_attention_matmuls_on_integer_kernels(
    observed_vit, tmp_path
):
    path = to_onnx(observed_vit, tmp_path / "vit.onnx", torch.zeros(1, 3, 32, 32))
    ops = optimized_ops(path, tmp_path)
    # per block: Q, K, V, out_proj and two MLP Linears; then the head
    assert ops["QGemm"] == 6 * DEPTH + 1, ops
    assert ops["MatMulInteger"] == DEPTH and ops["QLinearMatMul"] == DEPTH, ops
    # the patch embedding, whose output is float: ConvInteger, except with asymmetric
    # per-channel weights (onnxruntime's ConvInteger takes one weight zero point)
    symmetric = observed_vit.patch_embedding.weight_quantizer.symmetric
    embedding = "ConvInteger" if symmetric else "Conv"
    assert ops[embedding] == 1, ops
    assert not set(ops) - {embedding} & FLOAT_MATMULS, ops
    assert ops["LayerNormalization"] == 2 * DEPTH + 1 and ops["Softmax"] == DEPTH, ops


def test_what_the_transformer_export_cannot_write_is_refused_by_name():
    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.memory = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            memory = self.memory(x)
            return self.head(self.attention(x, memory, memory, need_weights=False)[0])

    model = _prepare(CrossAttention(), QuantConfig())
    model(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"attention.*cross-attention is not exported yet"):
        to_integer(model.eval())

    class TorchEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.encoder(x).mean(dim=1))

    model = _prepare(TorchEncoder(), QuantConfig())
    model(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="encoder: TransformerEncoder on integers"):
        to_integer(model.eval())
