"""`FoldedBatchNorm2d.normalize_rescaled`: the folded layer's batch-statistics correction in
one autograd node whose backward rescales the gradient in place, bit for bit the
``normalize(y.mul_(1 / f) + b)`` it replaces."""

import copy
from unittest import mock

import pytest
import torch
from torch import nn
from training_steps import MODELS, train

from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.nn import QuantConvBn2d
from lightning_qat.nn.folded_bn import FoldedBatchNorm2d


def reference(self, y, inv_factor, bias):
    """What `normalize_rescaled` replaced: autograd's multiplication, addition, BatchNorm."""
    z = y.mul_(inv_factor.to(y.dtype))
    if bias is not None:
        z = z + bias.to(z.dtype)
    return self.normalize(z)


def unfused():
    return mock.patch.object(FoldedBatchNorm2d, "normalize_rescaled", reference)


def folded_bn(channels, affine, momentum):
    bn = nn.BatchNorm2d(channels, affine=affine, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    return FoldedBatchNorm2d(bn)


def run(bn, y0, inv_factor, bias, grad_out):
    x = y0.clone().requires_grad_()
    y = x * 1  # a non-leaf, as a convolution's output
    out = bn.normalize_rescaled(y, inv_factor, bias)
    out.backward(grad_out)
    grads = [t.grad for t in (x, bias, bn.weight, bn.bias) if t is not None]
    return [out.detach(), *grads, *bn.buffers()]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 6, 1, 1)])
def test_values_gradients_and_statistics_bit_for_bit(
    memory_format, with_bias, affine, momentum, shape
):
    torch.manual_seed(0)
    bn = folded_bn(6, affine, momentum)
    y0 = torch.randn(shape).to(memory_format=memory_format)
    grad_out = torch.randn(shape).to(memory_format=memory_format)
    inv_factor = torch.rand(1, 6, 1, 1) + 0.5
    bias = torch.randn(1, 6, 1, 1)
    runs = []
    for fused in (True, False):
        b = bias.clone().requires_grad_() if with_bias else None
        this = copy.deepcopy(bn)
        if fused:
            runs.append(run(this, y0, inv_factor, b, grad_out))
        else:
            with unfused():
                runs.append(run(this, y0, inv_factor, b, grad_out))
    for a, b in zip(*runs, strict=True):
        assert a.stride() == b.stride()
        assert torch.equal(a, b)


def test_one_node_no_multiplication_in_the_backward():
    layer = QuantConvBn2d(3, 4, 3, bias=True, config=QuantConfig()).train()
    out = layer(torch.randn(2, 3, 8, 8))
    assert type(out.grad_fn).__name__ == "_RescaledBatchNormBackward"
    readers_of_the_conv = [
        type(node).__name__
        for node in _graph(out.grad_fn)
        for nxt, _ in node.next_functions
        if nxt is not None and type(nxt).__name__ == "ConvolutionBackward0"
    ]
    assert readers_of_the_conv == ["_RescaledBatchNormBackward"]


def _graph(node, seen=None):
    seen = set() if seen is None else seen
    if node is None or node in seen:
        return seen
    seen.add(node)
    for nxt, _ in node.next_functions:
        _graph(nxt, seen)
    return seen


def test_the_plain_expression_where_the_node_does_not_apply():
    # no gradient wanted, or a batch of one value per channel (F.batch_norm's error)
    layer = QuantConvBn2d(3, 4, 1, config=QuantConfig()).train()
    with torch.no_grad():
        assert layer(torch.randn(2, 3, 4, 4)).grad_fn is None
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize(
    "config",
    [QuantConfig(), QuantConfig(weight_bits=4, activation_bits=4, learn_scale=True)],
    ids=["w8a8", "lsq-w4a4"],
)
@pytest.mark.parametrize("name", list(MODELS))
def test_training_steps_bit_for_bit(name, config):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    base = prepare_qat(make(), config).to(memory_format=torch.channels_last)
    inputs = [torch.randn(shape).to(memory_format=torch.channels_last) for _ in range(3)]
    fused = train(copy.deepcopy(base), inputs)
    with unfused():
        plain = train(copy.deepcopy(base), inputs)
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)
