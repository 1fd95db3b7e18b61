"""Residual and branching models deployed: onnxruntime runs every layer, residual add and
concatenation on integer kernels, and the integer-only reference and the ONNX file compute
what the fake-quant model computes."""

from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from qat_digits import train_qat_digits
from test_export_integer import layer_input_codes
from test_graph_placement import Inception
from torch import nn

from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.app.models import ResNetCifar, mobilenet_v2_cifar, resnet20
from lightning_qat.export import (
    OnnxRuntimeModel,
    evaluate_deployment,
    plan_deployment,
    to_integer,
    to_onnx,
)
from lightning_qat.export.plan import Add, QuantizedLayer, Requantize

MODELS = {
    "resnet20": resnet20,
    "mobilenet_v2_cifar": mobilenet_v2_cifar,
    "torchvision_resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "torchvision_mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "inception": Inception,
}
#: what onnxruntime calls the float kernels it may fuse a Conv, Gemm, MatMul or Add into
FLOAT_KERNELS = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
FLOAT_KERNELS |= {"Add", "Sum", "Concat"}


def optimized_ops(path, tmp_path) -> Counter:
    """The op types of onnxruntime's optimized graph (what it actually runs)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def assert_deploys_the_fake_quant_logits(model: nn.Module, x: torch.Tensor, tmp_path) -> Counter:
    """The integer reference and the ONNX file (example input ``x[:1]``) compute the
    eval ``model``'s fake-quant logits on ``x`` (mean error below 1e-3 of the mean
    logit, top-1 equal); returns the ops of onnxruntime's optimized graph."""
    with torch.no_grad():
        fake, integer = model(x), to_integer(model)(x)
    path = to_onnx(model, tmp_path / "model.onnx", torch.zeros_like(x[:1]))
    deployed = OnnxRuntimeModel(path)(x)
    scale = fake.abs().mean()
    assert (integer - fake).abs().mean() / scale < 1e-3
    assert (deployed - integer).abs().mean() / scale < 1e-3
    assert torch.equal(deployed.argmax(1), fake.argmax(1))
    return optimized_ops(path, tmp_path)


def observed(name: str, symmetric: bool) -> nn.Module:
    torch.manual_seed(0)
    config = QuantConfig(symmetric=symmetric, quantize_first_input=True)
    model = prepare_qat(MODELS[name](), config).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module", params=[(n, s) for n in MODELS for s in (True, False)])
def deployed(request, tmp_path_factory):
    name, symmetric = request.param
    model = observed(name, symmetric)
    path = to_onnx(model, tmp_path_factory.mktemp(name) / "model.onnx", torch.zeros(1, 3, 32, 32))
    return name, model, path


def test_onnxruntime_runs_every_layer_add_and_concat_on_integer_kernels(deployed, tmp_path):
    name, model, path = deployed
    plan = plan_deployment(model)
    layers = [s for s in plan if isinstance(s, QuantizedLayer)]
    adds = [s for s in plan if isinstance(s, Add)]
    assert all(s.output_grid is not None for s in adds)  # every add requantizes
    ops = optimized_ops(path, tmp_path)
    assert not FLOAT_KERNELS & set(ops), ops
    convs = sum(s.kind == "conv" for s in layers)
    assert ops["QLinearConv"] == convs
    assert ops["QGemm"] == len(layers) - convs
    assert ops["QLinearAdd"] == len(adds)
    if name == "inception":
        assert ops["QLinearConcat"] == 1 and ops["QLinearAveragePool"] == 1
    if name != "inception":
        assert ops["QLinearGlobalAveragePool"] == 1  # the mean rounded on codes


def test_integer_reference_holds_the_fake_quant_codes_at_every_layer(deployed):
    """Each layer reads the codes the fake-quant model holds there; they differ by one step
    on rounding ties, and a differing code moves the codes after it."""
    _, model, _ = deployed
    torch.manual_seed(1)
    x = torch.randn(16, 3, 32, 32)
    seen, _ = layer_input_codes(model, x)
    with torch.no_grad():
        values = to_integer(model).codes(x)
    for step in plan_deployment(model):
        if isinstance(step, QuantizedLayer):
            diff = (values[step.inputs[0]] - seen[step.name]).abs()
            assert (diff == 0).float().mean() > 0.9, (step.name, (diff == 0).float().mean())


def test_onnx_and_the_integer_reference_compute_the_same_logits(deployed):
    _, model, path = deployed
    torch.manual_seed(2)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        integer = to_integer(model)(x)
        fake = model(x)
    got = OnnxRuntimeModel(path)(x)
    scale = fake.abs().mean()
    assert (got - integer).abs().mean() / scale < 0.02
    assert (integer - fake).abs().mean() / scale < 0.1


def tiny_resnet() -> nn.Module:
    """ResNet-8 for the 8x8 grey digits: a stem, three residual blocks (two with
    projection shortcuts), global pooling, fc."""
    return ResNetCifar(depth=8, in_channels=1)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_a_trained_residual_network_deploys_with_its_accuracy(symmetric, tmp_path):
    config = QuantConfig(symmetric=symmetric, quantize_first_input=True)
    model, data = train_qat_digits(config, model=tiny_resnet(), epochs=8, lr=0.05)
    x, y = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        fake_acc = (model(x).argmax(1) == y).float().mean().item()
    assert fake_acc > 0.95
    path = to_onnx(model, tmp_path / "resnet8.onnx", x[:1])
    for prefix, deployment in (("onnx", OnnxRuntimeModel(path)), ("int", to_integer(model))):
        result = evaluate_deployment(deployment, model, data.test_dataloader(), prefix)
        assert abs(result[f"{prefix}_test_acc"] - fake_acc) <= 0.003, result  # one image
        assert result[f"{prefix}_agreement"] >= 0.997, result


def test_what_cannot_be_deployed_is_named_with_its_module_path(tmp_path):
    class Swish(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x)
            return self.fc((x * torch.sigmoid(x)).mean((2, 3)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Swish()

        def forward(self, x):
            return self.block(x)

    with pytest.warns(UserWarning, match="stay float"):
        model = prepare_qat(Net(), QuantConfig()).train()
    model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"sigmoid\(conv\)\); block: mul \(conv \* sigmoid"):
        to_onnx(model.eval(), tmp_path / "m.onnx", torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"block: mul"):
        to_integer(model)


def test_a_residual_path_held_at_8_bits_deploys_with_4_bit_layers(tmp_path):
    """``residual_bits=8`` on a W4A4 ResNet: every add reads 256-level grids, every layer
    reads 16 levels (the first block's conv1 requantizing the stem's 8-bit output, which
    it shares with the add), and both deployments compute the fake-quant answers."""
    config = QuantConfig(
        weight_bits=4,
        activation_bits=4,
        activation_symmetric=False,
        quantize_first_input=True,
        residual_bits=8,
    )
    model, data = train_qat_digits(config, model=tiny_resnet(), epochs=6, lr=0.02)
    plan = plan_deployment(model)
    adds = [s for s in plan if isinstance(s, Add)]
    assert len(adds) == 3
    assert all(g.qmax - g.qmin == 255 for add in adds for g in add.input_grids)
    layers = [s for s in plan if isinstance(s, QuantizedLayer)]
    assert all(s.input_grid.qmax - s.input_grid.qmin == 15 for s in layers)
    (requantized,) = [s for s in plan if isinstance(s, Requantize)]
    assert requantized.input_grid.qmax - requantized.input_grid.qmin == 255
    assert requantized.output_grid.qmax - requantized.output_grid.qmin == 15

    x, y = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        fake_acc = (model(x).argmax(1) == y).float().mean().item()
    assert fake_acc > 0.95
    path = to_onnx(model, tmp_path / "resnet8.onnx", x[:1])
    ops = optimized_ops(path, tmp_path)
    assert not FLOAT_KERNELS & set(ops), ops
    for prefix, deployment in (("onnx", OnnxRuntimeModel(path)), ("int", to_integer(model))):
        result = evaluate_deployment(deployment, model, data.test_dataloader(), prefix)
        assert abs(result[f"{prefix}_test_acc"] - fake_acc) <= 0.003, result  # one image
        assert result[f"{prefix}_agreement"] >= 0.99, result
