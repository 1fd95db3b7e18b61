"""QuantConv2d, QuantLinear and QuantConvBn2d against float layers and the folding formulas."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_qat import QuantConfig, QuantConv2d, QuantConvBn2d, QuantLinear


def disable_quant(layer):
    for q in (layer.activation_quantizer, layer.weight_quantizer):
        q.enable_fake_quant(False).enable_observer(False)
    return layer


def conv_bn(groups=1, in_ch=8, out_ch=8, bias=False):
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(out_ch)
    # non-trivial affine parameters and running statistics
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


GEOMETRIES = [
    pytest.param(dict(groups=1), id="dense"),
    pytest.param(dict(groups=4), id="grouped"),
    pytest.param(dict(groups=8), id="depthwise"),
    pytest.param(dict(groups=1, bias=True), id="conv-bias"),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_convbn_without_quantization_matches_float_conv_bn_in_train_mode(geometry):
    conv, bn = conv_bn(**geometry)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    layer = disable_quant(QuantConvBn2d.from_float(conv, bn, QuantConfig()))
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref_bn(ref_conv(x_ref))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref_conv.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bn.weight.grad, ref_bn.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_convbn_without_quantization_matches_float_conv_bn_in_eval_mode(geometry):
    conv, bn = conv_bn(**geometry)
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn)).eval()
    layer = disable_quant(QuantConvBn2d.from_float(conv, bn, QuantConfig())).eval()
    x = torch.randn(4, 8, 10, 10)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def int32_bias(bias, activation_quantizer, weight_quantizer):
    """The bias on the accumulator's grid: s_b round(b / s_b), s_b = s_x s_w (Jacob et al.
    2018, section 2.4)."""
    scale = (activation_quantizer.scale * weight_quantizer.scale).double()
    return (torch.round(bias.double() / scale) * scale).float()


def folded_reference(layer, x):
    """conv(Q_a(x), Q_w(w_fold)) + Q_b(folded bias), written out from DESIGN.md section 3."""
    bn, wq, aq = layer.bn, layer.weight_quantizer, layer.activation_quantizer
    factor = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w_fold = layer.weight * factor.reshape(-1, 1, 1, 1)
    w_q = torch.fake_quantize_per_channel_affine(
        w_fold, wq.scale, wq.zero_point, 0, wq.quant_min, wq.quant_max
    )
    x_q = torch.fake_quantize_per_tensor_affine(
        x, aq.scale, aq.zero_point, aq.quant_min, aq.quant_max
    )
    conv_bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.bias)
    bias = int32_bias(bn.bias + (conv_bias - bn.running_mean) * factor, aq, wq)
    return F.conv2d(x_q, w_q, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mode", ["eval", "frozen"])
def test_convbn_eval_and_frozen_equal_folded_quantized_conv_exactly(geometry, symmetric, mode):
    conv, bn = conv_bn(**geometry)
    layer = QuantConvBn2d.from_float(conv, bn, QuantConfig(symmetric=symmetric))
    for _ in range(3):  # observe some batches and move the running statistics
        layer(torch.randn(4, 8, 10, 10))
    stats = (layer.bn.running_mean.clone(), layer.bn.running_var.clone())
    if mode == "eval":
        layer.eval()
    else:
        layer.freeze_bn()
        layer.activation_quantizer.enable_observer(False)
    x = torch.randn(4, 8, 10, 10)
    y = layer(x)
    assert torch.equal(y, folded_reference(layer, x))
    assert torch.equal(layer.bn.running_mean, stats[0])  # frozen: statistics untouched
    assert torch.equal(layer.bn.running_var, stats[1])


def test_convbn_training_uses_batch_statistics_correction():
    conv, bn = conv_bn()
    layer = QuantConvBn2d.from_float(conv, bn, QuantConfig())
    x = torch.randn(16, 8, 10, 10) * 2 + 1
    y = layer(x)
    # after the batch correction each channel is normalised by *batch* statistics:
    # mean beta and standard deviation gamma (up to quantization and eps)
    torch.testing.assert_close(y.mean((0, 2, 3)), layer.bn.bias, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        y.std((0, 2, 3), unbiased=False), layer.bn.weight, atol=1e-2, rtol=1e-2
    )


def test_convbn_gamma_zero_stays_finite():
    conv, bn = conv_bn()
    with torch.no_grad():
        bn.weight[3] = 0
    layer = QuantConvBn2d.from_float(conv, bn, QuantConfig())
    y = layer(torch.randn(4, 8, 10, 10))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 3], torch.full_like(y[:, 3], bn.bias[3].item()))


@pytest.mark.parametrize("cls", ["conv", "linear"])
def test_quant_conv_and_linear_quantize_input_and_weight(cls):
    if cls == "conv":
        float_layer = nn.Conv2d(3, 6, 3, groups=3)
        x = torch.randn(2, 3, 8, 8)
        layer = QuantConv2d.from_float(float_layer, QuantConfig(weight_bits=4))
        op = lambda xq, wq, b: F.conv2d(xq, wq, b, groups=3)  # noqa: E731
    else:
        float_layer = nn.Linear(5, 7)
        x = torch.randn(4, 5)
        layer = QuantLinear.from_float(float_layer, QuantConfig(weight_bits=4))
        op = lambda xq, wq, b: F.linear(xq, wq, b)  # noqa: E731
    y = layer(x)
    aq, wq = layer.activation_quantizer, layer.weight_quantizer
    x_q = torch.fake_quantize_per_tensor_affine(x, aq.scale, aq.zero_point, -127, 127)
    w_q = torch.fake_quantize_per_channel_affine(
        float_layer.weight, wq.scale, wq.zero_point, 0, -7, 7
    )
    assert torch.equal(y, op(x_q, w_q, int32_bias(float_layer.bias, aq, wq)))
    assert not torch.allclose(y, float_layer(x))  # 4-bit weights do change the output
    assert wq.scale.shape == (float_layer.weight.shape[0],)


def test_quantize_input_false_observes_but_keeps_input_float():
    layer = QuantLinear(4, 3, config=QuantConfig(), quantize_input=False)
    x = torch.randn(8, 4)
    layer(x)
    assert layer.activation_quantizer.observer.max_val.item() == x.max().item()
    w_q = layer.weight_quantizer(layer.weight)
    bias = int32_bias(layer.bias, layer.activation_quantizer, layer.weight_quantizer)
    assert torch.equal(layer(x), F.linear(x, w_q, bias))


@pytest.mark.parametrize("kind", ["conv", "convbn", "linear"])
def test_bf16_autocast_forward_and_backward(kind):
    if kind == "linear":
        layer, x = QuantLinear(16, 8), torch.randn(4, 16)
    elif kind == "conv":
        layer, x = QuantConv2d(4, 8, 3), torch.randn(2, 4, 8, 8)
    else:
        layer, x = QuantConvBn2d(4, 8, 3), torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer.weight_quantizer.scale.dtype == torch.float32
    assert torch.isfinite(layer.activation_quantizer.scale)
