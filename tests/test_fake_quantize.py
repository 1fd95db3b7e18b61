"""FakeQuantize and observers: EMA, switches, state_dict, non-finite input, dtype."""

import pytest
import torch

from lightning_qat import FakeQuantize, MovingAverageMinMaxObserver, QuantConfig


def test_ema_observer_first_batch_initialises_then_averages():
    obs = MovingAverageMinMaxObserver(momentum=0.25)
    obs(torch.tensor([-1.0, 2.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 2.0)
    obs(torch.tensor([-3.0, 6.0]))
    assert obs.min_val.item() == pytest.approx(-1.0 + 0.25 * (-3.0 + 1.0))
    assert obs.max_val.item() == pytest.approx(2.0 + 0.25 * (6.0 - 2.0))


def test_per_channel_observer_uses_the_channel_axis():
    obs = MovingAverageMinMaxObserver(momentum=1.0, num_channels=3, ch_axis=1)
    x = torch.arange(24.0).reshape(2, 3, 4)
    obs(x)
    assert obs.min_val.tolist() == [0.0, 4.0, 8.0]
    assert obs.max_val.tolist() == [15.0, 19.0, 23.0]


def test_matches_torch_ao_moving_average_fake_quant():
    ao = pytest.importorskip("torch.ao.quantization")
    theirs = ao.FakeQuantize(
        observer=ao.MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        averaging_constant=0.01,
    )
    ours = FakeQuantize.for_activations(QuantConfig(symmetric=False))
    for _ in range(5):
        x = torch.randn(64, 16) * 3 + 1
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.scale, theirs.scale.reshape(()))
    # same grid: our signed code is the unsigned one shifted by 128
    assert ours.zero_point.item() + 128 == theirs.zero_point.item()


def test_nonfinite_batch_is_left_out_of_the_range_with_one_warning():
    fq = FakeQuantize.for_activations(QuantConfig())
    fq.observer.name = "features.3.activation_quantizer"
    fq(torch.tensor([-1.0, 2.0]))
    before = (fq.observer.min_val.clone(), fq.observer.max_val.clone(), fq.scale.clone())
    with pytest.warns(RuntimeWarning, match=r"features\.3\.activation_quantizer.*NaN or Inf"):
        out = fq(torch.tensor([0.5, float("nan"), float("inf")]))
    assert torch.equal(fq.observer.min_val, before[0])
    assert torch.equal(fq.observer.max_val, before[1])
    assert torch.equal(fq.scale, before[2]) and fq.scale > 0
    assert out[0] == pytest.approx(0.5, abs=fq.scale.item())
    fq(torch.tensor([float("nan")]))  # counted, not warned again
    assert fq.observer.num_nonfinite.item() == 2


def test_switches_disable_observation_and_fake_quant():
    fq = FakeQuantize.for_activations(QuantConfig(observer="minmax"))
    x = torch.tensor([0.1234, -1.0, 1.0])
    fq(x)
    scale = fq.scale.clone()
    fq.enable_observer(False)
    fq(x * 10)
    assert torch.equal(fq.scale, scale)
    assert not torch.equal(fq(x), x)
    fq.enable_fake_quant(False)
    assert torch.equal(fq(x), x)


def test_activation_range_moves_only_in_training_weight_range_also_in_eval():
    act = FakeQuantize.for_activations(QuantConfig())
    weight = FakeQuantize.for_weights(QuantConfig(), 2)
    act(torch.tensor([-1.0, 1.0]))
    weight(torch.ones(2, 3))
    act.eval()
    weight.eval()
    act(torch.tensor([-100.0, 100.0]))
    weight(torch.full((2, 3), 5.0))
    assert act.observer.max_val.item() == 1.0
    assert weight.observer.max_val.tolist() == [5.0, 5.0]


def test_state_dict_round_trip_keeps_ranges_qparams_and_switches():
    a = FakeQuantize.for_weights(QuantConfig(symmetric=False), 4)
    a(torch.randn(4, 10))
    a.enable_observer(False)
    b = FakeQuantize.for_weights(QuantConfig(symmetric=False), 4)
    b.load_state_dict(a.state_dict())
    for key in ("scale", "zero_point", "observer.min_val", "observer.max_val"):
        assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert b.observer_enabled is False and b.fake_quant_enabled is True
    x = torch.randn(4, 10)
    assert torch.equal(a(x), b(x))


def test_bf16_input_is_quantized_in_float32_and_returned_in_bf16():
    fq = FakeQuantize.for_activations(QuantConfig(observer="minmax"))
    x = torch.randn(1000).to(torch.bfloat16)
    out = fq(x)
    assert out.dtype == torch.bfloat16 and fq.scale.dtype == torch.float32
    expected = torch.fake_quantize_per_tensor_affine(
        x.float(), fq.scale, fq.zero_point, fq.quant_min, fq.quant_max
    ).to(torch.bfloat16)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_path_equals_torch_public_op_forward_and_backward(symmetric):
    fq = FakeQuantize.for_activations(QuantConfig(symmetric=symmetric, observer="minmax"))
    fq(torch.randn(1000))
    fq.enable_observer(False)
    x = (torch.randn(4, 8, 5, 5) * 4).to(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(4, 8, 5, 5)
    out = fq(x)
    ref = torch.fake_quantize_per_tensor_affine(
        x_ref, fq.scale, fq.zero_point, fq.quant_min, fq.quant_max
    )
    assert torch.equal(out, ref)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert 0 < (x.grad == 0).sum() < x.numel()  # some elements were clipped, some were not


def test_clipping_counts_elements_outside_the_range():
    fq = FakeQuantize.for_activations(QuantConfig(observer="minmax"))
    fq(torch.tensor([-1.27, 1.27]))  # s = 0.01
    fq.enable_observer(False)
    fq.clipping_counts = {"clipped": 0, "total": 0}
    fq(torch.tensor([-2.0, -1.274, 0.0, 1.27, 1.2749, 1.3, 5.0, 0.5]))
    assert fq.clipping_counts == {"clipped": 3, "total": 8}


def test_sqnr_is_about_6db_per_bit():
    from lightning_qat.quant import sqnr_db

    x = torch.rand(100_000) * 2 - 1
    values = {}
    for bits in (4, 8):
        fq = FakeQuantize.for_weights(QuantConfig(weight_bits=bits, per_channel=False), 1)
        values[bits] = sqnr_db(x, fq(x))
    assert 22 < values[8] - values[4] < 26  # 4 bits * 6.02 dB
    assert sqnr_db(x, x) == float("inf")


def _host_reads(step) -> int:
    """Values read back to the host while ``step()`` runs: each would wait for a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    return sum(1 for e in profiler.events() if e.name == "aten::_local_scalar_dense")


@pytest.mark.parametrize("learn_scale", [False, True])
@pytest.mark.parametrize("narrow_range", [True, False])
def test_symmetric_per_channel_weights_read_nothing_on_the_host_and_keep_their_codes(
    learn_scale, narrow_range
):
    """The per-channel kernel gets a float zero point (0.0) on a symmetric grid: torch
    then skips its host-side range check of an integer zero point, two reads per weight
    quantizer per step, and the codes and gradients are those of the int32 zero point."""
    config = QuantConfig(weight_bits=4, learn_scale=learn_scale, weight_narrow_range=narrow_range)
    fq = FakeQuantize.for_weights(config, num_channels=8).train()
    first = (torch.randn(8, 4, 3, 3) * 2).requires_grad_()
    fq(first).sum().backward()  # the first step observes (and, LSQ, starts learning)
    if not learn_scale:
        fq.enable_observer(False)  # the observer's own non-finite check reads on the CPU
    w = (first.detach() * 1.5).requires_grad_()  # beyond the grid: some elements clip
    grad = torch.randn(8, 4, 3, 3)

    def step():
        fq(w).backward(grad)

    assert _host_reads(step) == 0
    w_ref = w.detach().clone().requires_grad_()

    def with_int_zero_point():  # torch's kernel given the int32 zero point
        zero_point = torch.zeros(8, dtype=torch.int32)
        scale = fq.scale.detach()
        return torch.fake_quantize_per_channel_affine(
            w_ref, scale, zero_point, 0, fq.quant_min, fq.quant_max
        )

    ref = with_int_zero_point()
    ref.backward(grad)
    assert torch.equal(fq(w.detach()), ref.detach())
    assert torch.equal(w.grad, w_ref.grad)
    assert 0 < (w.grad == 0).sum() < w.numel()  # some elements clipped, some not
    assert _host_reads(with_int_zero_point) == 2  # its range check: what the float one skips
