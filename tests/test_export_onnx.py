"""ONNX QDQ export: onnxruntime runs it on int8 kernels and it scores what training did."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from qat_digits import train_qat_digits
from torch import nn

from lightning_qat import FakeQuantize, QuantConfig, prepare_qat
from lightning_qat.app.models import NIN
from lightning_qat.export import (
    OnnxRuntimeModel,
    evaluate_deployment,
    plan_deployment,
    to_integer,
    to_onnx,
)
from lightning_qat.export.plan import QuantizedLayer
from lightning_qat.quant import MIN_SCALE

INT8, UINT8 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8


@pytest.fixture(
    scope="module",
    params=[
        # (name, config, weight types: int8 where the layer's input codes stay in 0..127)
        ("sym_fold", dict(symmetric=True), [UINT8, INT8, INT8, INT8]),
        ("asym_fold", dict(symmetric=False), [UINT8] * 4),
        ("sym_unfold", dict(symmetric=True, bn_fold=False), [UINT8, INT8, INT8, INT8]),
        (
            "sym_fold_float_first_input",
            dict(symmetric=True, quantize_first_input=False),
            [INT8] * 4,
        ),
    ],
    ids=lambda p: p[0],
)
def trained(request):
    options = {"quantize_first_input": True, **request.param[1]}
    model, data = train_qat_digits(QuantConfig(**options))
    model.weight_types = request.param[2]
    return model, data


def optimized_ops(path, tmp_path) -> Counter:
    """The op types of onnxruntime's optimized graph (what it actually runs)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_onnx_accuracy_equals_the_fake_quant_model(trained, tmp_path):
    model, data = trained
    x, y = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))
    path = to_onnx(model, tmp_path / "lenet.onnx", x[:1])
    deployed = OnnxRuntimeModel(path)
    result = evaluate_deployment(deployed, model, data.test_dataloader(), "onnx")
    with torch.no_grad():
        fake = model(x)
    fake_acc = (fake.argmax(1) == y).float().mean().item()
    assert result["onnx_test_images"] == len(y) == 360
    assert abs(result["onnx_test_acc"] - fake_acc) <= 0.001  # within 0.1 points
    assert result["onnx_agreement"] >= 0.999
    logits = deployed(x)
    assert logits.shape == fake.shape  # the batch dimension is dynamic
    torch.testing.assert_close(logits, fake, atol=0.02 * fake.abs().max().item(), rtol=0)


def test_onnxruntime_fuses_every_quantized_layer_into_an_integer_kernel(trained, tmp_path):
    model, _ = trained
    path = to_onnx(model, tmp_path / "lenet.onnx", torch.zeros(1, 1, 8, 8))
    graph = onnx.load(path).graph
    types = {t.name: t.data_type for t in graph.initializer}
    codes = [t for name, t in types.items() if name.endswith("_weight_codes")]
    # uint8 weights where the input codes reach past 127: int8 ones could saturate
    # onnxruntime's int16 pair sums on x86 CPUs without VNNI
    assert codes == model.weight_types
    assert all(t == onnx.TensorProto.INT32 for n, t in types.items() if n.endswith("_bias_codes"))
    activation_zero_points = [
        t
        for n, t in types.items()
        if n.endswith("_zero_point") and "_weight_" not in n and "_bias_" not in n
    ]
    assert set(activation_zero_points) == {onnx.TensorProto.UINT8}
    ops = optimized_ops(path, tmp_path)
    # LeNet: conv, conv, linear, linear. Every layer whose input is quantized runs on
    # integers; the last layer's output is float (QGemm dequantizes it).
    float_first = graph.node[0].op_type != "QuantizeLinear"
    assert ops["QLinearConv"] == 2 - float_first
    assert ops["Conv"] + ops["FusedConv"] == float_first
    assert ops["QGemm"] == 2 and ops["Gemm"] == 0


def test_the_first_input_is_exported_as_trained_unless_asked(tmp_path):
    model, _ = train_qat_digits(QuantConfig(quantize_first_input=False), epochs=1)
    example = torch.zeros(1, 1, 8, 8)
    as_trained = onnx.load(to_onnx(model, tmp_path / "a.onnx", example)).graph
    assert as_trained.node[0].op_type == "DequantizeLinear"  # a weight: the input stays float
    quantized = onnx.load(to_onnx(model, tmp_path / "b.onnx", example, quantize_input=True))
    assert quantized.graph.node[0].op_type == "QuantizeLinear"
    assert quantized.graph.node[0].input[0] == "input"


class Tiny(nn.Sequential):
    """Every step the export writes: conv with ReLU on codes, max and average pooling on
    codes, flatten on codes, a linear layer without ReLU (signed codes), a last layer."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 16),
            nn.Linear(16, 5),
        )


def observed(model: nn.Module, config: QuantConfig, shape) -> nn.Module:
    """``model`` prepared for QAT, its activation ranges observed on random batches."""
    torch.manual_seed(0)
    model = prepare_qat(model, config).train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, *shape))
    return model.eval()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().mean() / want.abs().mean())


def assert_deploys_like_the_integer_reference(model, x, tmp_path) -> torch.Tensor:
    """The export's output is as close to the fake-quant model as the exact integer
    reference's (both requantize each layer's output to the next layer's grid, and flips
    of one step on rounding ties spread through the layers) and never farther: a missing
    ReLU clamp or range clip, a shifted grid or a wrong scale make it several times
    farther. The inputs are three times wider than the observed ranges, so clipping
    matters."""
    with torch.no_grad():
        fake = model(x)
        integer = to_integer(model)(x).float()
    got = OnnxRuntimeModel(to_onnx(model, tmp_path / "model.onnx", x[:1]))(x)
    onnx_error, integer_error = relative_error(got, fake), relative_error(integer, fake)
    assert onnx_error <= 1.25 * integer_error + 1e-4, (onnx_error, integer_error)
    return got


@pytest.mark.parametrize(
    "config",
    [
        dict(symmetric=True),
        dict(symmetric=False),
        dict(symmetric=True, activation_bits=4, weight_bits=4),
        dict(symmetric=False, activation_bits=5, per_channel=False),
        dict(symmetric=True, bn_fold=False),
    ],
    ids=["sym8", "asym8", "sym_w4a4", "asym_a5_per_tensor", "sym8_unfolded"],
)
def test_every_step_matches_fake_quantization_on_a_tiny_model(config, tmp_path):
    model = observed(Tiny(), QuantConfig(quantize_first_input=True, **config), (3, 16, 16))
    x = 3 * torch.randn(256, 3, 16, 16)
    assert_deploys_like_the_integer_reference(model, x, tmp_path)


@pytest.mark.parametrize("weight_bits", [8, 2])
def test_full_range_weights_deploy_with_their_most_negative_code(weight_bits, tmp_path):
    """``weight_narrow_range=False`` (LSQ's grid): -128 (or -2) codes reach the integer
    reference and onnxruntime (int8 weights, or uint8 ones shifted by 128) as trained."""
    config = QuantConfig(
        quantize_first_input=True, weight_bits=weight_bits, weight_narrow_range=False
    )
    model = observed(Tiny(), config, (3, 16, 16))
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantize) and m.holds_weights]
    with torch.no_grad():
        for quantizer in quantizers:  # clipped ranges, as learned steps end up
            quantizer.enable_observer(False).scale.mul_(0.5)
    layers = [m for m in model.modules() if hasattr(m, "weight_to_quantize")]
    for layer in layers:
        quantizer, weight = layer.weight_quantizer, layer.weight_to_quantize()
        scale = quantizer.scale.reshape(-1, *[1] * (weight.dim() - 1))
        codes = torch.round(quantizer(weight).detach() / scale)
        assert codes.min() == quantizer.quant_min == -(2 ** (weight_bits - 1))
    x = 3 * torch.randn(256, 3, 16, 16)
    assert_deploys_like_the_integer_reference(model, x, tmp_path)
    with torch.no_grad():
        assert relative_error(to_integer(model)(x).float(), model(x)) < 1e-2


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_nin_exports_with_its_float_global_pooling(symmetric, tmp_path):
    config = QuantConfig(symmetric=symmetric, quantize_first_input=True)
    model = observed(NIN(widths=(16, 12, 8, 16, 16, 16, 16, 16)), config, (3, 32, 32))
    x = 3 * torch.randn(64, 3, 32, 32)
    got = assert_deploys_like_the_integer_reference(model, x, tmp_path)
    with torch.no_grad():
        assert relative_error(got, model(x)) < 0.02
    ops = [n.op_type for n in onnx.load(tmp_path / "model.onnx").graph.node]
    # the last conv's output is float (pooled in float): ConvInteger with one weight zero
    # point (symmetric), a Conv on dequantized codes with per-channel zero points
    assert ops.count("ConvInteger") == int(symmetric)
    assert ops.count("Conv") + ops.count("ConvInteger") == 9 and ops.count("MaxPool") == 2
    assert ops[-3:] == ["GlobalAveragePool", "Flatten", "Identity"]


def test_an_mlp_that_flattens_its_input_first_exports(tmp_path):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4))
    model = observed(mlp, QuantConfig(quantize_first_input=True), (3, 4, 4))
    assert_deploys_like_the_integer_reference(model, 3 * torch.randn(64, 3, 4, 4), tmp_path)


def test_a_dead_channel_keeps_its_bias_in_int32(tmp_path):
    """A channel with all-zero weights (pruned) behind a BN with a bias: the minimum weight
    scale would put ``b / (s_x s_w)`` far past int32; its scale is raised instead."""
    torch.manual_seed(0)
    float_model = Tiny()
    with torch.no_grad():
        float_model[0].weight[3] = 0
        float_model[1].bias[3] = 50.0
    model = observed(float_model, QuantConfig(quantize_first_input=True), (3, 16, 16))
    first = next(s for s in plan_deployment(model) if isinstance(s, QuantizedLayer))
    assert first.bias.abs().max() < 2**31 - 1
    assert first.weight_scale[3] > MIN_SCALE and (first.weight_codes[3] == 0).all()
    assert_deploys_like_the_integer_reference(model, torch.randn(64, 3, 16, 16), tmp_path)


def test_what_cannot_be_exported_is_named(tmp_path):
    model = prepare_qat(
        nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)), QuantConfig()
    )
    model(torch.randn(8, 4))
    with pytest.raises(ValueError, match="Sigmoid"):
        to_onnx(model.eval(), tmp_path / "m.onnx", torch.zeros(1, 4))
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    model = prepare_qat(nn.Sequential(*pooled, nn.Linear(8, 2)), QuantConfig())
    model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="AdaptiveAvgPool2d"):
        to_onnx(model.eval(), tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_runtime_model_takes_any_float_tensor(tmp_path):
    model = prepare_qat(nn.Sequential(nn.Linear(4, 3)), QuantConfig()).train()
    model(torch.randn(16, 4))
    deployed = OnnxRuntimeModel(to_onnx(model.eval(), tmp_path / "m.onnx", torch.zeros(1, 4)))
    out = deployed(torch.randn(5, 4, dtype=torch.float64)[:, :4])
    assert out.shape == (5, 3) and out.dtype == torch.float32
    assert isinstance(deployed.run(np.zeros((2, 4), np.float32)), np.ndarray)
