"""Quantizer placement from the traced graph: residual adds, shared inputs, concatenations,
pools, float islands (DESIGN.md section 6)."""

import copy
import io
import pickle

import pytest
import torch
import torchvision
from torch import nn

from lightning_qat import QuantConfig, activation_quantizers, plan_qat, prepare_qat, quantizers
from lightning_qat.app.models import mobilenet_v2_cifar, resnet20
from lightning_qat.graph import QuantizeOutput


def observe(model: nn.Module, shape=(3, 32, 32), batches=3) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, *shape))
    return model.eval()


def test_resnet20_quantizes_both_add_inputs_and_the_add_output_once():
    model = prepare_qat(resnet20(), QuantConfig())
    block = model.layers[0]
    # the stem's output feeds the first conv of the block and its identity shortcut: one
    # grid, applied where the stem's ReLU returns it, shared by the conv
    stem = model.relu.output_quantizer
    assert block.conv1.activation_quantizer is stem and block.conv1.input_quantized_upstream
    assert block.bn2.output_quantizer is not stem  # the residual branch's own grid
    # the add's output after its ReLU (TFLite's fused activation) feeds the next block
    assert model.layers[1].conv1.activation_quantizer is block.relu2.output_quantizer
    # projection shortcuts quantize their output for the add
    assert hasattr(model.layers[3].shortcut[1], "output_quantizer")
    # the last block's output is pooled (the mean rounded on codes) and read by fc
    assert hasattr(model.layers[8].relu2, "output_quantizer")
    assert not model.fc.input_quantized_upstream
    # 21 tensors besides the layers' own inputs: stem, 9 x (residual branch, add output),
    # 2 projection shortcuts
    standalone = [n for n, _ in activation_quantizers(model) if n.endswith("output_quantizer")]
    assert len(standalone) == 21


def test_a_module_called_twice_gets_the_quantizer_at_the_block_boundary():
    # torchvision's BasicBlock calls self.relu twice: its second output is the block's
    model = prepare_qat(torchvision.models.resnet18(num_classes=10), QuantConfig())
    block = model.layer1[0]
    assert not hasattr(block.relu, "output_quantizer")
    assert model.layer1[1].conv1.activation_quantizer is block.output_quantizer
    assert any(isinstance(h, QuantizeOutput) for h in block._forward_hooks.values())
    # a downsampling block's input feeds two convolutions: one shared grid
    down = model.layer2[0]
    assert down.conv1.activation_quantizer is down.downsample[0].activation_quantizer


def test_mobilenet_v2_residual_blocks_quantize_their_sum_at_the_block_output():
    model = prepare_qat(mobilenet_v2_cifar(), QuantConfig())
    residual = model.features[5]  # x + conv(x), read by the next residual block
    assert residual.use_res_connect and hasattr(residual, "output_quantizer")
    assert model.features[6].conv[0][0].activation_quantizer is residual.output_quantizer


def test_chains_keep_each_layer_quantizing_its_own_input():
    """LeNet/NIN: no standalone quantizer, the state_dict keys of before."""
    from lightning_qat.app.models import NIN

    model = prepare_qat(NIN(widths=(8, 8, 8, 8, 8, 8, 8, 8)), QuantConfig())
    assert all(n.endswith("activation_quantizer") for n, _ in activation_quantizers(model))
    assert not any("output_quantizer" in k for k in model.state_dict())


def test_the_model_stays_the_users_model():
    model = resnet20()
    forward = type(model).forward
    parameters = list(model.parameters())
    float_keys = set(model.state_dict())
    prepare_qat(model, QuantConfig())
    assert type(model).forward is forward and "forward" not in vars(model)
    assert type(model.layers[0]).__name__ == "BasicBlock"
    assert list(model.parameters()) == parameters or all(
        a is b for a, b in zip(model.parameters(), parameters, strict=True)
    )
    assert float_keys <= set(model.state_dict())
    observe(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(clone(x), out)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = prepare_qat(resnet20(), QuantConfig()).eval()
    fresh.load_state_dict(torch.load(buffer))  # strict: every key has its place
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_a_shared_quantizer_observes_once_per_step():
    model = prepare_qat(resnet20(), QuantConfig(observer="minmax"))
    stem = model.relu.output_quantizer
    calls = []
    stem.observer.register_forward_hook(lambda *args: calls.append(1))
    model.train()(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1


def test_every_activation_quantizer_trains_calibrates_and_freezes():
    model = observe(prepare_qat(resnet20(), QuantConfig()))
    for name, quantizer in activation_quantizers(model):
        assert torch.isfinite(quantizer.observer.min_val).all(), name
    names = [n for n, _ in activation_quantizers(model)]
    assert len(names) == len({id(q) for _, q in activation_quantizers(model)})
    weights = {id(q) for n, q in quantizers(model) if n.endswith("weight_quantizer")}
    assert not weights & {id(q) for _, q in activation_quantizers(model)}


class Inception(nn.Module):
    """Two branches concatenated, then an average pool between integer layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        x = self.head(self.pool(x))
        return self.fc(x.mean((2, 3)))


def test_concatenation_inputs_and_pooling_between_layers_get_their_grids():
    model = prepare_qat(Inception(), QuantConfig())
    # the stem's output feeds two convolutions: shared
    assert model.left[0].activation_quantizer is model.right[0].activation_quantizer
    # each concatenated input on its own grid (requantized to the output's grid)
    assert hasattr(model.left[1], "output_quantizer") and hasattr(
        model.right[1], "output_quantizer"
    )
    # no module returns the concatenation; the pool that alone reads it quantizes its input
    # (the pool sits between integer layers: its mean is rounded on codes)
    assert hasattr(model.pool, "input_quantizer") and not hasattr(model.pool, "output_quantizer")
    assert model.head.activation_quantizer is not model.pool.input_quantizer  # pooled: new grid
    assert not plan_qat(Inception(), QuantConfig()).placement.stays_float


def test_float_islands_are_named_at_conversion():
    class SqueezeExcite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.conv2 = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            x = self.conv(x)
            return self.conv2(x * torch.sigmoid(x))

    with pytest.warns(UserWarning, match=r"stay float.*mul \(conv \* sigmoid\(conv\)\)"):
        prepare_qat(SqueezeExcite(), QuantConfig())


def test_nothing_is_warned_about_models_that_deploy_whole():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in (resnet20(), mobilenet_v2_cifar(), torchvision.models.resnet18()):
            prepare_qat(model, QuantConfig())
