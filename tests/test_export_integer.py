"""Integer-only export: fixed-point arithmetic, exactness, agreement with the fake-quant
model."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from qat_digits import train_qat_digits
from torch import nn

from lightning_qat import QuantConfig, prepare_qat, quantized_layers
from lightning_qat.export import plan_deployment, quantize_multiplier, requantize, to_integer
from lightning_qat.export.integer import EXACT_FLOAT32, IntegerLayer, exact_digits
from lightning_qat.export.plan import QuantizedLayer, quantize_codes


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
    assert ((got.double() - exact).abs() <= 0.5 + 1e-6).all()  # one rounding
    # gemmlowp's two roundings: at most 1/2 + 2^-(n+1)
    got = requantize(acc, m0, shift, rounding="gemmlowp")
    bound = torch.where(shift > 0, 0.5 + 0.5 * 2.0 ** (-shift.double()), 0.5)
    assert ((got.double() - exact).abs() <= bound + 1e-9).all()


def test_single_rounding_is_round_half_to_even_of_the_exact_product():
    m0, shift = quantize_multiplier(torch.tensor([0.000555, 0.25, 0.5, 1.7]))
    acc = torch.cat([torch.randint(-(2**24), 2**24, (3000,)), torch.arange(-8, 9)])
    for column in range(4):
        got = requantize(acc, m0[column], shift[column]).tolist()
        scale = Fraction(int(m0[column]), 2 ** (31 + int(shift[column])))
        # Python's round() of a Fraction rounds half to even, exactly
        assert got == [round(a * scale) for a in acc.tolist()]


def test_gemmlowp_rounding_is_kept_as_an_option():
    # the Q31 high multiply rounds ties up; the shift (RoundingDivideByPOT) away from zero
    m0, shift = quantize_multiplier(torch.tensor([0.5]))
    assert requantize(torch.tensor([3, -3, 5, -5]), m0, shift, "gemmlowp").tolist() == [
        2,
        -1,
        3,
        -2,
    ]
    m0, shift = quantize_multiplier(torch.tensor([0.25]))
    assert shift.item() == 1
    ties = torch.tensor([2, -2, 6, -6])
    assert requantize(ties, m0, shift, "gemmlowp").tolist() == [1, -1, 2, -2]
    assert requantize(ties, m0, shift).tolist() == [0, 0, 2, -2]  # to even
    # two roundings: 0.49951 * ... lands on the wrong side of the tie, one rounding not
    m0, shift = quantize_multiplier(torch.tensor([0.0005552664854940564]))
    assert requantize(torch.tensor([-18909]), m0, shift, "gemmlowp").item() == -11
    assert requantize(torch.tensor([-18909]), m0, shift).item() == -10


def test_float32_convolution_on_digits_is_exact_where_one_convolution_would_not_be():
    torch.manual_seed(0)
    # the widest asymmetric uint8 differences, of one sign: the sums pass 2^24
    weight = torch.randint(200, 256, (16, 64, 5, 5))
    x = torch.randint(200, 256, (4, 64, 12, 12))
    assert 255 * weight.abs().flatten(1).sum(1).max() >= EXACT_FLOAT32  # one would round
    digits = exact_digits(weight, 255)
    assert len(digits) > 1
    assert torch.equal(sum(d << s for s, d in digits), weight)
    got = sum(F.conv2d(x.float(), d.float(), padding=2).long() << s for s, d in digits)
    want = F.conv2d(x.double(), weight.double(), padding=2).long()
    assert torch.equal(got, want)
    # the split is needed: one float32 convolution of the same integers rounds
    assert not torch.equal(F.conv2d(x.float(), weight.float(), padding=2).long(), want)


def test_small_weights_need_one_convolution():
    weight = torch.randint(-20, 21, (8, 16, 3, 3))
    assert len(exact_digits(weight, 127)) == 1


@pytest.fixture(scope="module", params=["sym_fold", "asym_fold"])
def trained(request):
    config = QuantConfig(symmetric=request.param.startswith("sym"), quantize_first_input=True)
    return train_qat_digits(config)


def layer_input_codes(model, x):
    """The fake-quant model's input codes at each quantized layer, by layer name."""
    seen = {}

    def record(name, layer):
        def hook(module, args):
            q = layer.activation_quantizer
            seen[name] = quantize_codes(args[0], q.scale, q.zero_point, q.quant_min, q.quant_max)

        return hook

    hooks = [m.register_forward_pre_hook(record(n, m)) for n, m in quantized_layers(model)]
    with torch.no_grad():
        out = model(x)
    for hook in hooks:
        hook.remove()
    return seen, out


def test_integer_model_agrees_with_fake_quant_top1_and_per_layer(trained):
    model, data = trained
    integer = to_integer(model)
    x = torch.cat([b[0] for b in data.test_dataloader()])
    seen, fake = layer_input_codes(model, x)
    with torch.no_grad():
        values = integer.codes(x)
        out = integer(x)
    agreement = (out.argmax(1) == fake.argmax(1)).float().mean().item()
    assert agreement >= 0.999
    for step in plan_deployment(model):
        if isinstance(step, QuantizedLayer):
            diff = (values[step.inputs[0]] - seen[step.name]).abs()
            assert diff.max() <= 1, step.name
            assert (diff == 0).float().mean() > 0.99, step.name  # rounding ties differ by 1
    torch.testing.assert_close(out, fake, atol=0.05 * fake.abs().max().item(), rtol=0)


def test_integer_layers_hold_integers_only(trained):
    integer = to_integer(trained[0])
    layers = [step for step in integer.steps if isinstance(step, IntegerLayer)]
    assert len(layers) == 4
    for step in layers:
        assert step.weight.dtype == torch.int64 and step.bias.dtype == torch.int64
        assert step.weight.abs().max() <= 255
        assert step.bias.abs().max() < 2**31
        if step.requantizes:
            assert step.m0.dtype == torch.int64


def test_unfolded_batchnorm_deploys_as_its_fake_quant_model_on_digits():
    config = QuantConfig(bn_fold=False, quantize_first_input=True)
    model, data = train_qat_digits(config)
    integer = to_integer(model)
    x, y = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        fake, deployed = model(x).argmax(1), integer(x).argmax(1)
    assert (fake == y).float().mean() > 0.9
    assert (deployed == fake).float().mean() > 0.99


@pytest.mark.parametrize(
    ("symmetric", "narrow_range"),
    [(True, True), (False, True), (True, False)],
    ids=["sym", "asym", "sym_full_range"],
)
def test_unfolded_batchnorm_folds_into_the_weight_scales_keeping_the_trained_codes(
    symmetric, narrow_range
):
    """The BN after an unfolded conv scales each output channel: folded into the weight
    scale and the bias, the trained codes kept (mirrored on the grid where gamma < 0; on
    the full symmetric range -128 mirrors to 127, zero point -1)."""
    torch.manual_seed(0)
    float_model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    )
    config = QuantConfig(
        bn_fold=False,
        symmetric=symmetric,
        quantize_first_input=True,
        weight_narrow_range=narrow_range,
    )
    model = prepare_qat(float_model, config).train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 6, 6))
        model[1].weight[::3] *= -1  # some channels flip their sign
        model[1].weight[7] = 0  # and one is pruned: its shift alone
        if not narrow_range:  # a clipped range, as learned steps have: -128 in use
            model[0].weight_quantizer.enable_observer(False).scale.mul_(0.5)
    model.eval()
    x = torch.randn(64, 3, 6, 6)
    with torch.no_grad():
        fake, deployed = model(x), to_integer(model)(x)
    assert (deployed - fake).abs().mean() / fake.abs().mean() < 1e-3
    step = next(s for s in plan_deployment(model) if isinstance(s, QuantizedLayer))
    quantizer = model[0].weight_quantizer
    shape = (-1, 1, 1, 1)
    trained = quantizer(model[0].weight).detach().double()
    codes = torch.round(trained / quantizer.scale.reshape(shape)).long()
    codes = codes + quantizer.zero_point.reshape(shape)  # as trained
    negative = (model[1].weight < 0).reshape(shape)
    mirror = quantizer.quant_min + quantizer.quant_max
    assert torch.equal(step.weight_codes[:7], torch.where(negative, mirror - codes, codes)[:7])
    assert torch.equal(step.weight_codes[7], torch.full_like(codes[7], step.weight_zero_point[7]))
    assert (step.weight_scale > 0).all()
    assert step.weight_codes.min() >= quantizer.quant_min
    assert step.weight_codes.max() <= quantizer.quant_max
    assert negative.any() and (codes == quantizer.quant_min).any()  # the mirror is needed


def test_unsupported_modules_are_named():
    model = prepare_qat(
        nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)), QuantConfig()
    )
    model(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"1: Sigmoid"):
        to_integer(model.eval())
    fresh = prepare_qat(nn.Sequential(nn.Linear(4, 2)), QuantConfig())
    with pytest.raises(ValueError, match="never observed"):
        to_integer(fresh)


def test_export_never_reduces_ranges_over_ranks(trained, monkeypatch):
    """After a DDP run the other ranks may be gone: exporting on rank zero must not reach
    the observers' all-reduce (each observer keeps its setting afterwards)."""
    import torch.distributed as dist

    from lightning_qat import quantizers

    model = trained[0]
    for _, quantizer in quantizers(model):
        quantizer.observer.sync = True
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)

    def unreachable(*args, **kwargs):
        raise AssertionError("export called all_reduce")

    monkeypatch.setattr(dist, "all_reduce", unreachable)
    to_integer(model)
    assert all(q.observer.sync for _, q in quantizers(model))
