"""Hand-computed quantization examples (DESIGN.md section 3)."""

import pytest
import torch

from lightning_qat import FakeQuantize, MinMaxObserver, QuantConfig, compute_qparams, quant_range
from lightning_qat.quant import MIN_SCALE


def fake_quant(x, bits, symmetric, num_channels=None):
    fq = FakeQuantize(MinMaxObserver(num_channels), bits=bits, symmetric=symmetric)
    return fq(x), fq


def test_ranges_narrow_symmetric_full_asymmetric():
    assert quant_range(8, True) == (-127, 127)
    assert quant_range(8, False) == (-128, 127)
    assert quant_range(4, True) == (-7, 7)
    assert quant_range(4, False) == (-8, 7)
    assert quant_range(2, True) == (-1, 1)


def test_full_symmetric_range_adds_the_most_negative_code_only():
    assert quant_range(8, True, narrow_range=False) == (-128, 127)
    assert quant_range(2, True, narrow_range=False) == (-2, 1)
    assert quant_range(4, False, narrow_range=True) == (-8, 7)  # asymmetric: always full


def test_full_range_weights_reach_minus_2_at_2_bits_with_zero_point_0():
    config = QuantConfig(weight_bits=2, weight_narrow_range=False)
    fq = FakeQuantize.for_weights(config, num_channels=2)
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5], [-3.0, -1.0, 0.0, 1.0]])
    fq(w)  # s = max|w| / qmax = max|w| per channel
    fq.enable_observer(False)
    fq.scale.mul_(0.5)  # a clipped range, as LSQ or an MSE search picks at 2 bits
    out = fq(w)
    assert (fq.quant_min, fq.quant_max) == (-2, 1) and not fq.zero_point.any()
    codes = torch.round(out / fq.scale[:, None])
    assert torch.equal(codes, torch.tensor([[-2.0, -1, 0, 1], [-2, -1, 0, 1]]))
    assert (FakeQuantize.for_weights(QuantConfig(weight_bits=2), 2).quant_min) == -1


def test_symmetric_8bit_per_tensor_by_hand():
    # max|x| = 7.9375 = 127/16, so s = 1/16 exactly; q = round(x * 16)
    x = torch.tensor([-1.0, 0.03, 0.1, 7.9375, -7.9375, 2.0])
    out, fq = fake_quant(x, 8, True)
    assert fq.scale.item() == 0.0625 and fq.zero_point.item() == 0
    q = torch.tensor([-16, 0, 2, 127, -127, 32])
    torch.testing.assert_close(out, q * 0.0625, rtol=0, atol=0)


def test_narrow_range_never_produces_minus_128():
    fq = FakeQuantize(MinMaxObserver(), bits=8, symmetric=True)
    fq(torch.tensor([-1.27, 1.27]))  # s = 0.01
    fq.enable_observer(False)
    out = fq(torch.tensor([-5.0, -1.28, -1.27]))
    torch.testing.assert_close(out, torch.full((3,), -127 * fq.scale.item()))


def test_asymmetric_8bit_per_tensor_by_hand():
    # range [-1, 3]: s = 4/255, z = round(-128 - (-1)/s) = round(-64.25) = -64
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    _, fq = fake_quant(x, 8, False)
    s = 4 / 255
    assert fq.scale.item() == pytest.approx(s, rel=1e-7)
    assert fq.zero_point.item() == -64
    fq.enable_observer(False)
    out = fq(torch.tensor([-1.0, 0.0, 1.0, 3.0, 5.0]))
    q = torch.tensor([-128, -64, 0, 127, 127])  # 1.0/s = 63.75 -> 64 -> q = 0; 5.0 clips
    torch.testing.assert_close(out, (q + 64) * fq.scale.item(), rtol=0, atol=1e-7)
    assert out[1].item() == 0.0


def test_symmetric_4bit_per_channel_by_hand():
    w = torch.tensor([[0.7, -0.3, 0.1], [-1.4, 0.2, 0.0]])  # s = 0.7/7, 1.4/7
    out, fq = fake_quant(w, 4, True, num_channels=2)
    torch.testing.assert_close(fq.scale, torch.tensor([0.1, 0.2]))
    assert fq.zero_point.tolist() == [0, 0]
    q = torch.tensor([[7, -3, 1], [-7, 1, 0]])
    torch.testing.assert_close(out, q * fq.scale[:, None])


def test_asymmetric_4bit_per_channel_by_hand():
    # channel 0: [0, 1.5] -> s = 0.1, z = -8;  channel 1: [-3, 0] -> s = 0.2, z = -8 + 15 = 7
    w = torch.tensor([[0.0, 1.5, 0.74], [-3.0, 0.0, -1.25]])
    out, fq = fake_quant(w, 4, False, num_channels=2)
    torch.testing.assert_close(fq.scale, torch.tensor([0.1, 0.2]))
    assert fq.zero_point.tolist() == [-8, 7]
    q = torch.tensor([[-8, 7, -1], [-8, 7, 1]])  # 0.74/0.1 -> 7; -1.25/0.2 = -6.25 -> -6
    expected = (q - fq.zero_point[:, None]) * fq.scale[:, None]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.5, 0.7], [-3.0, 0.0, -1.2]]))


def test_asymmetric_8bit_per_channel_matches_formula():
    w = torch.randn(6, 3, 3, 3)
    out, _fq = fake_quant(w, 8, False, num_channels=6)
    lo = w.flatten(1).amin(1).clamp(max=0)
    hi = w.flatten(1).amax(1).clamp(min=0)
    s = (hi - lo) / 255
    z = torch.round(-128 - lo / s).clamp(-128, 127)
    q = torch.clamp(torch.round(w / s[:, None, None, None]) + z[:, None, None, None], -128, 127)
    expected = (q - z[:, None, None, None]) * s[:, None, None, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_is_exactly_representable(bits):
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        lo, hi = sorted((torch.randn(2, generator=g) * 10).tolist())
        s, z = compute_qparams(torch.tensor(lo), torch.tensor(hi), *quant_range(bits, False), False)
        zero = torch.fake_quantize_per_tensor_affine(
            torch.zeros(3), s, z, *quant_range(bits, False)
        )
        assert torch.equal(zero, torch.zeros(3)), (lo, hi, s, z)


def test_straight_through_gradient_is_zero_outside_the_range():
    fq = FakeQuantize(MinMaxObserver(), bits=8, symmetric=True)
    fq(torch.tensor([-1.27, 1.27]))
    fq.enable_observer(False)
    x = torch.tensor([-2.0, -1.27, -0.5, 0.0, 0.5, 1.27, 2.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "x",
    [torch.zeros(2, 3, 4), torch.full((2, 3, 4), 3.5), torch.full((2, 3, 4), -1e-30)],
    ids=["zeros", "constant", "tiny"],
)
def test_degenerate_tensors_get_a_small_positive_finite_scale(x, symmetric):
    out, fq = fake_quant(x, 8, symmetric)
    assert torch.isfinite(fq.scale).all() and (fq.scale >= MIN_SCALE).all()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x, rtol=0, atol=float(fq.scale))


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_channel_gets_a_positive_scale(symmetric):
    w = torch.randn(4, 8)
    w[2] = 0
    out, fq = fake_quant(w, 8, symmetric, num_channels=4)
    assert (fq.scale > 0).all() and torch.isfinite(fq.scale).all()
    assert torch.equal(out[2], torch.zeros(8))


def test_unobserved_range_gives_a_finite_scale():
    s, z = compute_qparams(torch.tensor(float("inf")), torch.tensor(float("-inf")), -127, 127, True)
    assert torch.isfinite(s) and s > 0 and z == 0
    s, z = compute_qparams(torch.tensor(float("nan")), torch.tensor(float("nan")), -128, 127, False)
    assert torch.isfinite(s) and s > 0
