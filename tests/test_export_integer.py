"""Integer-only export: fixed-point arithmetic and agreement with the fake-quant model."""

import pytest
import torch
from qat_digits import train_qat_digits
from torch import nn

from lightning_qat import QuantConfig, prepare_qat, quantized_layers
from lightning_qat.export import quantize_multiplier, requantize, to_integer
from lightning_qat.export.integer import IntegerLayer


def test_multiplier_is_q31_with_a_shift_and_requantizes_within_half_an_lsb():
    multipliers = torch.tensor([0.0123, 0.5, 0.999999, 1.7, 3e-5])
    m0, shift = quantize_multiplier(multipliers)
    assert ((m0 >= 2**30) & (m0 < 2**31)).all()
    assert torch.allclose(
        m0.double() / 2**31 * 2.0 ** (-shift.double()), multipliers.double(), rtol=1e-9
    )
    acc = torch.randint(-(2**20), 2**20, (20000, 5))
    exact = acc.double() * multipliers.double()
    got = requantize(acc, m0, shift)
    # two roundings (the Q31 high multiply, then the shift by n): at most 1/2 + 2^-(n+1)
    bound = torch.where(shift > 0, 0.5 + 0.5 * 2.0 ** (-shift.double()), 0.5)
    assert ((got.double() - exact).abs() <= bound + 1e-9).all()


def test_rounding_matches_gemmlowp():
    # the Q31 high multiply rounds ties up; the shift (RoundingDivideByPOT) away from zero
    m0, shift = quantize_multiplier(torch.tensor([0.5]))
    assert requantize(torch.tensor([3, -3, 5, -5]), m0, shift).tolist() == [2, -1, 3, -2]
    m0, shift = quantize_multiplier(torch.tensor([0.25]))
    assert shift.item() == 1
    assert requantize(torch.tensor([2, -2, 6, -6]), m0, shift).tolist() == [1, -1, 2, -2]


@pytest.fixture(scope="module", params=["sym_fold", "asym_fold"])
def trained(request):
    config = QuantConfig(symmetric=request.param.startswith("sym"), quantize_first_input=True)
    return train_qat_digits(config)


def test_integer_model_agrees_with_fake_quant_top1_and_per_layer(trained):
    model, data = trained
    integer = to_integer(model)
    x = torch.cat([b[0] for b in data.test_dataloader()])
    # the fake-quant model's codes at each quantized layer's input
    seen = {}
    hooks = [
        layer.activation_quantizer.register_forward_pre_hook(
            lambda q, args, n=name: seen.__setitem__(
                n,
                torch.clamp(
                    torch.round(args[0] / q.scale) + q.zero_point, q.quant_min, q.quant_max
                ).long(),
            )
        )
        for name, layer in quantized_layers(model)
    ]
    with torch.no_grad():
        fake = model(x)
        outputs = integer.codes(x)
    for hook in hooks:
        hook.remove()
    agreement = (outputs[-1].argmax(1) == fake.argmax(1)).float().mean().item()
    assert agreement >= 0.999
    names = iter(n for n, _ in quantized_layers(model))
    for position, step in enumerate(integer):
        if not isinstance(step, IntegerLayer):
            continue
        name = next(names)
        codes = outputs[position - 1]  # what enters this layer: input codes, pooled, flat
        diff = (codes - seen[name]).abs()
        assert diff.max() <= 1, name
        assert (diff == 0).float().mean() > 0.97, name  # rounding ties differ by 1 LSB
    torch.testing.assert_close(
        outputs[-1].float(), fake, atol=0.05 * fake.abs().max().item(), rtol=0
    )


def test_integer_layers_hold_integers_only(trained):
    integer = to_integer(trained[0])
    for step in integer:
        if isinstance(step, IntegerLayer):
            assert step.weight.dtype == torch.int64 and step.bias.dtype == torch.int64
            assert step.weight.abs().max() <= 255
            assert step.bias.abs().max() < 2**31
            if step.requantizes:
                assert step.m0.dtype == torch.int64


def test_unfolded_batchnorm_is_folded_on_export_and_its_cost_measured():
    config = QuantConfig(bn_fold=False, quantize_first_input=True)
    model, data = train_qat_digits(config)
    integer = to_integer(model)
    x, y = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        fake_acc = (model(x).argmax(1) == y).float().mean().item()
        int_acc = (integer(x).argmax(1) == y).float().mean().item()
    assert fake_acc > 0.9 and int_acc > fake_acc - 0.05


def test_unsupported_modules_are_named():
    model = prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)), QuantConfig())
    model(torch.randn(8, 4))
    with pytest.raises(ValueError, match="GELU"):
        to_integer(model.eval())
    fresh = prepare_qat(nn.Sequential(nn.Linear(4, 2)), QuantConfig())
    with pytest.raises(ValueError, match="never observed"):
        to_integer(fresh)
