"""Conv1d (with BatchNorm1d folded; deployed to the integer reference and ONNX) and
ConvTranspose2d quantized like Conv2d (issue 14), and the layers lightning-qat does not
quantize named, never left float silently."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_export_graphs import FLOAT_KERNELS, assert_deploys_the_fake_quant_logits
from torch import nn

from lightning_qat import QuantConfig, QuantizationAwareTraining, plan_qat, prepare_qat, quantizers
from lightning_qat.export import to_integer
from lightning_qat.nn import QuantConv1d, QuantConvBn1d, QuantConvTranspose2d
from lightning_qat.prepare import apply_plan


def _fake_quant(model: nn.Module, enabled: bool) -> None:
    for _, quantizer in quantizers(model):
        quantizer.enable_fake_quant(enabled)


def _prepare(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat(model, config or QuantConfig())


def test_conv1d_with_batchnorm1d_folds_and_matches_float_with_quantizers_off():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(3, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 4, 3, groups=4)
    )
    reference = copy.deepcopy(net)
    model = _prepare(net)
    assert isinstance(model[0], QuantConvBn1d) and isinstance(model[3], QuantConv1d)
    x = torch.randn(6, 3, 20)
    _fake_quant(model, False)
    # training: batch statistics, running statistics updated as the float BatchNorm does
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    _fake_quant(model, True)
    assert not torch.allclose(model(x), reference(x), atol=1e-6)
    codes = model[0].weight_quantizer(model[0].weight_to_quantize())
    scale = model[0].weight_quantizer.scale.reshape(-1, 1, 1)
    assert torch.allclose(codes / scale, (codes / scale).round(), atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose2d_quantizes_each_output_channel(groups):
    torch.manual_seed(0)
    float_conv = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups)
    with torch.no_grad():  # output channel 1 (group 0, j=1) much larger than the rest
        float_conv.weight[: 4 // groups, 1] *= 100
    conv = QuantConvTranspose2d.from_float(float_conv, QuantConfig())
    x = torch.randn(2, 4, 5, 5)
    out = conv(x)
    assert out.shape == float_conv(x).shape == (2, 6, 10, 10)
    scales = conv.weight_quantizer.scale
    assert scales.shape == (6,) and scales.argmax() == 1 and scales[1] > 50 * scales[0]
    _fake_quant(conv, False)
    torch.testing.assert_close(conv(x), float_conv(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        conv(x, output_size=[9, 9]), float_conv(x, output_size=[9, 9]), rtol=0, atol=1e-6
    )


def _conv1d_block(inputs: int, outputs: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv1d(inputs, outputs, 5, stride=stride, padding=2, bias=False),
        nn.BatchNorm1d(outputs),
        nn.ReLU(),
    ]


def one_d_cnn() -> nn.Module:
    """A 1-D CNN over sequences: Conv1d+BN1d+ReLU blocks, max, average and global pools."""
    return nn.Sequential(
        *_conv1d_block(2, 16, 1),
        nn.MaxPool1d(2),
        *_conv1d_block(16, 32, 2),
        nn.AvgPool1d(2),
        *_conv1d_block(32, 32, 1),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_1d_cnn_deploys_on_integer_kernels_computing_the_fake_quant_logits(symmetric, tmp_path):
    torch.manual_seed(0)
    config = QuantConfig(symmetric=symmetric, quantize_first_input=True)
    model = _prepare(one_d_cnn(), config).train()
    assert isinstance(model[0], QuantConvBn1d)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 2, 64))
    model.eval()
    ops = assert_deploys_the_fake_quant_logits(model, torch.randn(32, 2, 64), tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 1, ops
    assert not set(ops) & FLOAT_KERNELS, ops


def decoder() -> nn.Module:
    """Down, then up twice with transposed convolutions (grouped with output padding; the
    k=2, s=2 upsampling of U-Nets), then a classifier head."""
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def _observe(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape))
    return model.eval()


@pytest.mark.parametrize("symmetric", [True, False])
def test_conv_transpose2d_deploys_as_a_convolution_on_spread_out_codes(symmetric, tmp_path):
    torch.manual_seed(0)
    config = QuantConfig(symmetric=symmetric, quantize_first_input=True)
    model = _observe(_prepare(decoder(), config).train(), (2, 8, 8))
    assert isinstance(model[3], QuantConvTranspose2d) and isinstance(model[5], QuantConvTranspose2d)
    ops = assert_deploys_the_fake_quant_logits(model, torch.randn(32, 2, 8, 8), tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 1, ops
    assert "ConvTranspose" not in ops and not set(ops) & FLOAT_KERNELS, ops


def test_conv_transpose2d_spreads_its_input_with_the_zero_point():
    """The integer model's spread-out input, checked position by position: the codes at
    multiples of the stride, the zero point elsewhere and in the output padding."""
    torch.manual_seed(0)
    config = QuantConfig(symmetric=False, quantize_first_input=True)
    model = _observe(_prepare(decoder(), config).train(), (2, 8, 8))
    integer = to_integer(model)
    values = integer.codes(torch.randn(2, 2, 8, 8))
    index = next(i for i, name in enumerate(integer.values) if name.endswith("_spread"))
    spread, source = values[integer.values[index]], values[integer.inputs[index][0]]
    zero_point = model[3].activation_quantizer.zero_point.item()
    assert spread.shape[-2:] == (8, 8)  # (4 - 1) * 2 + 1 + output padding 1
    assert torch.equal(spread[..., 0:7:2, 0:7:2], source)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[0:7:2, 0:7:2] = False
    assert (spread[..., mask] == zero_point).all() and zero_point != 0


def test_conv_transpose2d_with_a_batchnorm_after_it_deploys_its_fake_quant_model():
    torch.manual_seed(0)
    float_model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 2, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16 * 16, 3),
    )
    config = QuantConfig(quantize_first_input=True)
    model = _observe(_prepare(float_model, config).train(), (2, 8, 8))
    x = torch.randn(64, 2, 8, 8)
    integer = to_integer(model)
    with torch.no_grad():  # the codes the Linear reads, fake-quant and deployed
        quantizer = model[6].activation_quantizer
        fake = torch.round(quantizer(model[:5](x)) / quantizer.scale) + quantizer.zero_point
    values = integer.codes(x)
    deployed = values[integer.inputs[-1][0]].reshape(fake.shape)
    # the BN (not folded in training) folds into the weight scales, the codes kept: the
    # codes agree up to rounding ties (float BN arithmetic in the fake-quant model)
    differ = (deployed - fake).abs()
    assert differ.max() <= 1 and (differ > 0).float().mean() < 1e-3


def test_conv_transpose2d_the_export_cannot_express_is_refused_by_name():
    torch.manual_seed(0)
    model = _prepare(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 2, 2, padding=2)))
    _observe(model.train(), (2, 8, 8))
    with pytest.raises(ValueError, match=r"1: .*padding larger than dilation"):
        to_integer(model)


def test_layers_it_does_not_quantize_are_named_and_strict_refuses_them(capsys):
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.scale = nn.Parameter(torch.ones(8))
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            out, _ = self.lstm(self.embed(tokens))
            return self.head(self.norm(out) * self.scale)

    with pytest.warns(UserWarning, match="hold weights and stay float") as record:
        plan = plan_qat(Tagger())
    message = str(record[0].message)
    for name in ("embed (Embedding)", "lstm (LSTM): recurrent", "norm (LayerNorm)", "Tagger"):
        assert name in message
    assert plan.layers == ["head"]
    by_name = {f.name: f for f in plan.left_float}
    assert by_name["norm"].by_design and not by_name["lstm"].by_design
    assert "scale" in by_name[""].reason
    callback = QuantizationAwareTraining(QuantConfig())
    callback._plan = plan  # as at conversion: the layer table lists what stays float
    callback._print_layers(apply_plan(Tagger(), callback.config, plan))
    table = capsys.readouterr().out
    assert "LSTM" in table and "recurrent" in table and "LayerNorm" in table
    with pytest.raises(ValueError, match=r"lstm \(LSTM\): recurrent layers are not exported"):
        to_integer(apply_plan(Tagger(), QuantConfig(), plan))
    with pytest.raises(ValueError, match="strict") as error:
        plan_qat(Tagger(), QuantConfig(strict=True))
    assert "lstm" in str(error.value) and "norm" not in str(error.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_qat(Tagger(), QuantConfig(strict=True, exclude=["", "embed", "lstm"]))
    assert plan.layers == ["head"]


def test_fully_quantized_cnn_names_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_qat(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    assert plan.left_float == []


def test_a_module_marked_float_island_is_float_by_design():
    from lightning_qat.app.models import vit_tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_qat(vit_tiny(width=32, depth=1, heads=2), QuantConfig(strict=True))
    (embedding,) = [f for f in plan.left_float if f.name == "position_embedding"]
    assert embedding.by_design and "position embedding" in embedding.reason
