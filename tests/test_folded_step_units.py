"""Folded layers whose learned weight step is in the weight's units
(``QuantConfig(folded_step_units="weight")``): codes that do not move with the fold
factor, the unfolded layer's training, the folded layer's deployment."""

import copy
import dataclasses

import pytest
import torch
from qat_digits import train_qat_digits
from test_learned_scale import LSQ_W4A4, float_trained_resnet8, run_lsq
from torch import nn

from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.export import OnnxRuntimeModel, evaluate_deployment, to_integer, to_onnx
from lightning_qat.nn import QuantConv2d, QuantConvBn2d

W4_LSQ = QuantConfig(weight_bits=4, activation_bits=8, learn_scale=True, weight_narrow_range=False)


def conv_and_bn(seed=0):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
    with torch.no_grad():  # statistics far from 1, and two channels with a negative gamma
        bn.running_var.uniform_(0.5, 4)
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 2)[:2].neg_()
    return conv, bn


def folded_layer(units):
    conv, bn = conv_and_bn()
    config = dataclasses.replace(W4_LSQ, folded_step_units=units)
    layer = QuantConvBn2d.from_float(conv, bn, config).train()
    layer(torch.randn(16, 3, 8, 8))  # learning starts: the steps come from the weights
    return layer


def weight_codes(layer):
    """The codes of the folded weight on its grid (as the export reads them)."""
    with torch.no_grad():
        factor = layer.fold_factor()
        quantized = layer.quantized_folded_weight(factor)
        scale = layer.folded_weight_scale(factor)
        if scale is None:
            scale = layer.weight_quantizer.scale.detach().reshape(-1)
        return torch.round(quantized / scale.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("units", ["weight", "folded"])
def test_weight_units_keep_the_codes_when_the_fold_factor_moves(units):
    layer = folded_layer(units)
    before = weight_codes(layer)
    with torch.no_grad():  # the statistics and gamma move, as they do in training
        layer.bn.running_var.mul_(torch.linspace(0.2, 5, 8))
        layer.bn.weight.mul_(1.5)
    after = weight_codes(layer)
    if units == "weight":
        assert torch.equal(after, before)
    else:  # the folded weight moves under a step that stays: the codes change
        assert (after != before).float().mean() > 0.2


def test_weight_units_train_as_the_unfolded_layer_before_the_freeze():
    """Batch statistics: ``BN_batch(conv(x, Q(w)))`` with LSQ on ``w``, the output and
    every gradient of the float Conv -> BatchNorm with a quantized conv."""
    conv, bn = conv_and_bn()
    config = dataclasses.replace(W4_LSQ, folded_step_units="weight")
    folded = QuantConvBn2d.from_float(copy.deepcopy(conv), copy.deepcopy(bn), config).train()
    unfolded = nn.Sequential(
        QuantConv2d.from_float(copy.deepcopy(conv), config), copy.deepcopy(bn)
    ).train()
    x = torch.randn(16, 3, 8, 8)
    out, expected = folded(x), unfolded(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # (a random projection: BN's output has a constant sum of squares, whose gradient
    # is all cancellation)
    projection = torch.randn_like(out)
    (out * projection).sum().backward()
    (expected * projection).sum().backward()
    pairs = [
        (folded.weight, unfolded[0].weight),
        (folded.weight_quantizer.scale, unfolded[0].weight_quantizer.scale),
        (folded.bn.weight, unfolded[1].weight),
        (folded.bn.bias, unfolded[1].bias),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(folded.bn.running_var, unfolded[1].running_var)


def test_weight_units_after_the_freeze_compute_the_folded_layer_on_its_grid():
    """Frozen or in eval: ``conv(x, f · Q(w)) + Q_b(folded bias)``, the bias on the int32
    grid of scale ``s_x s |f|``: the integer model's arithmetic."""
    layer = folded_layer("weight").freeze_bn()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out = layer(x)
        factor = layer.fold_factor()
        step = layer.weight_quantizer.scale.reshape(-1)
        codes = torch.round(layer.weight / step.reshape(-1, 1, 1, 1)).clamp(-8, 7)
        weight = codes * (step * factor).reshape(-1, 1, 1, 1)
        bias_scale = layer.activation_quantizer.scale * step * factor.abs()
        bias = torch.round(layer.folded_bias(factor) / bias_scale) * bias_scale
        expected = nn.functional.conv2d(layer.activation_quantizer(x), weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_units_travel_with_the_layer_state():
    layer = folded_layer("weight")
    plain = QuantConvBn2d(3, 8, 3, bias=False, config=W4_LSQ)
    assert not plain.step_in_weight_units
    plain.load_state_dict(layer.state_dict())
    assert plain.step_in_weight_units
    # a checkpoint from before the option learned in the folded weight's units
    state = {k: v for k, v in layer.state_dict().items()}
    state["_extra_state"] = {"bn_frozen": False}
    plain.load_state_dict(state)
    assert not plain.step_in_weight_units


def test_an_unknown_unit_is_refused():
    with pytest.raises(ValueError, match="folded_step_units='bn'"):
        QuantConfig(folded_step_units="bn")


def test_observer_based_layers_are_unchanged_by_the_units():
    """Without learned steps the option changes nothing (an observed range follows the
    folded weight): the quantized weights are the default's, bit for bit."""
    conv, bn = conv_and_bn()
    x = torch.randn(16, 3, 8, 8)
    outs = []
    for units in ("folded", "weight"):
        layer = QuantConvBn2d.from_float(
            copy.deepcopy(conv), copy.deepcopy(bn), QuantConfig(folded_step_units=units)
        ).train()
        outs.append(layer(x))
        assert not layer.step_in_weight_units
    assert torch.equal(*outs)


@pytest.mark.parametrize("bits", [4, 2])
def test_a_residual_network_with_weight_unit_steps_deploys_as_it_computes(bits, tmp_path):
    """ResNet-8 fine-tuned with LSQ, steps in the weight's units, BN frozen for the last
    epoch: the integer reference and onnxruntime compute the fake-quant model's top-1
    (each negative-gamma channel's codes mirrored, every scale multiplied by |f|)."""
    config = dataclasses.replace(
        LSQ_W4A4,
        weight_bits=bits,
        activation_bits=bits,
        quantize_first_input=True,
        weight_narrow_range=False,
        folded_step_units="weight",
    )
    float_model = float_trained_resnet8()
    with torch.no_grad():  # a negative gamma somewhere: the mirrored codes are exercised
        next(m for m in float_model.modules() if isinstance(m, nn.BatchNorm2d)).weight[:3].neg_()
    model, data = train_qat_digits(config, model=float_model, epochs=3, lr=0.01)
    assert all(m.step_in_weight_units for m in model.modules() if isinstance(m, QuantConvBn2d))
    x, y = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        fake_acc = (model(x).argmax(1) == y).float().mean().item()
    assert fake_acc > (0.9 if bits == 4 else 0.6)
    path = to_onnx(model, tmp_path / "resnet8.onnx", x[:1])
    for prefix, deployment in (("onnx", OnnxRuntimeModel(path)), ("int", to_integer(model))):
        result = evaluate_deployment(deployment, model, data.test_dataloader(), prefix)
        assert abs(result[f"{prefix}_test_acc"] - fake_acc) <= 0.003, result
        assert result[f"{prefix}_agreement"] >= 0.995, result


def test_resume_with_weight_unit_steps_ends_exactly_as_the_uninterrupted_run(tmp_path):
    config = dataclasses.replace(LSQ_W4A4, folded_step_units="weight")
    full, _ = run_lsq(tmp_path, "full", config=config)
    expected = full.state_dict()
    resumed, _ = run_lsq(
        tmp_path, "resumed", config=config, ckpt_path=tmp_path / "full" / "epoch=1.ckpt"
    )
    got = resumed.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
    layers = [m for m in resumed.modules() if isinstance(m, QuantConvBn2d)]
    assert layers and all(m.step_in_weight_units for m in layers)


def test_prepare_qat_passes_the_units_to_every_folded_layer():
    model = prepare_qat(
        float_trained_resnet8(epochs=0), dataclasses.replace(W4_LSQ, folded_step_units="weight")
    )
    layers = [m for m in model.modules() if isinstance(m, QuantConvBn2d)]
    assert layers and all(m.step_in_weight_units for m in layers)
