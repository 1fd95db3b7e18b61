"""The compiled eager CPU pass of per-tensor fake quantization (`fake_quantize_compiled`,
`masked_gradient`): bit for bit torch's kernel, in every layout, forward and backward;
off with LIGHTNING_QAT_COMPILED_KERNELS=0; torch's kernel where compiling fails."""

from __future__ import annotations

import pytest
import torch

from lightning_qat.quant import compiled_kernels
from lightning_qat.quant.compiled_kernels import fake_quantize_compiled, masked_gradient
from lightning_qat.quant.fake_quantize import _PerTensorFakeQuant


def _input(shape: tuple[int, ...], layout: str) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    flat = x.view(-1)
    # the rounding ties, the grid's ends, zeros and non-finite values
    flat[:8] = torch.tensor([0.5, 1.5, -0.5, 127.5, -127.5, 0.0, float("nan"), float("inf")])
    flat[8:10] = torch.tensor([-float("inf"), 128.49])
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "gaps":
        return torch.cat([x, x], dim=-1)[..., : shape[-1]]
    return x


def _reference(x, scale, zero_point, qmin, qmax, after_relu):
    enabled = torch.ones(1, dtype=torch.long)
    out, mask = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
        x, scale, zero_point, enabled, qmin, qmax
    )
    return out, mask & (x > 0) if after_relu else mask


CASES = [
    ((4, 6, 5, 5), "contiguous"),
    ((4, 6, 5, 5), "channels_last"),
    ((4, 6, 5, 5), "gaps"),
    ((7, 33), "contiguous"),
    ((3, 5, 17), "contiguous"),
]
GRIDS = [(-127, 127, 0), (0, 255, 37), (-8, 7, 0), (0, 3, 1)]


@pytest.mark.parametrize("after_relu", [False, True])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{layout}" for s, layout in CASES])
def test_compiled_pass_is_torchs_kernel_bit_for_bit(shape, layout, grid, after_relu):
    qmin, qmax, zp = grid
    x = _input(shape, layout) * (1.0 / 0.37)
    scale, zero_point = torch.tensor(0.37), torch.tensor(zp, dtype=torch.int32)
    result = fake_quantize_compiled(x, scale, zero_point, qmin, qmax, after_relu)
    assert result is not None, "the compiled pass was not used"
    out, mask = result
    ref_out, ref_mask = _reference(x, scale, zero_point, qmin, qmax, after_relu)
    assert out.shape == x.shape and mask.dtype == torch.uint8
    assert torch.equal(out.nan_to_num(nan=1e9), ref_out.nan_to_num(nan=1e9))
    assert torch.equal(mask.bool(), ref_mask)
    if layout != "gaps":
        assert out.stride() == x.stride() and mask.stride() == x.stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_training_step_gradient_is_the_kernels_straight_through_gradient(layout, monkeypatch):
    x = _input((4, 6, 5, 5), layout).relu()
    scale, zero_point = torch.tensor(0.02), torch.tensor(0, dtype=torch.int32)
    grad = torch.randn(4, 6, 5, 5)  # contiguous, whatever x's layout

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_()
        out = _PerTensorFakeQuant.apply(leaf, scale, zero_point, -127, 127, True)
        saved = out.grad_fn.saved_tensors[0]
        (grad_x,) = torch.autograd.grad(out, leaf, grad)
        return out, grad_x, saved

    out, grad_x, saved = step()
    assert saved.dtype == torch.uint8, "the compiled pass was not used"
    monkeypatch.setenv("LIGHTNING_QAT_COMPILED_KERNELS", "0")
    ref_out, ref_grad, ref_saved = step()
    assert ref_saved.dtype == torch.bool
    assert torch.equal(out, ref_out)
    assert torch.equal(grad_x, ref_grad)
    assert torch.equal(torch.where(ref_saved, grad, 0.0), grad_x)


def test_masked_gradient_reads_a_mask_in_another_layout():
    mask = (torch.randn(2, 3, 4, 4) > 0).to(torch.uint8).to(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, 4, 4)
    assert torch.equal(masked_gradient(grad, mask), torch.where(mask.bool(), grad, 0.0))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("LIGHTNING_QAT_COMPILED_KERNELS", "0")
    x, scale, zero_point = torch.randn(8), torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    assert fake_quantize_compiled(x, scale, zero_point, -127, 127) is None


def test_not_used_off_the_cpu_float32_path():
    scale, zero_point = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    assert fake_quantize_compiled(torch.randn(8).double(), scale, zero_point, -127, 127) is None


def test_a_failed_compilation_warns_once_and_falls_back_to_torchs_kernel(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled_kernels, "_compiled", lambda name, fn: broken)
    monkeypatch.setitem(compiled_kernels._state, "failed", False)
    x = torch.randn(4, 8).requires_grad_()
    scale, zero_point = torch.tensor(0.05), torch.tensor(0, dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        out = _PerTensorFakeQuant.apply(x, scale, zero_point, -127, 127, False)
    assert out.grad_fn.saved_tensors[0].dtype == torch.bool
    assert not compiled_kernels.compiled_kernels_enabled()
    ref = torch.fake_quantize_per_tensor_affine(x.detach(), scale, zero_point, -127, 127)
    assert torch.equal(out, ref)


def test_the_output_can_be_updated_in_place_as_a_residual_add_does():
    x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    scale, zero_point = torch.tensor(0.05), torch.tensor(0, dtype=torch.int32)
    out = _PerTensorFakeQuant.apply(x, scale, zero_point, -127, 127, False)
    assert out.grad_fn.saved_tensors[0].dtype == torch.uint8, "the compiled pass was not used"
    out += 1.0
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{layout}" for s, layout in CASES])
def test_in_place_pass_writes_the_kernels_result_over_its_input(shape, layout, grid):
    """``in_place`` (a ReLU's output): the same bits, written over a dense input and
    returned as that very tensor; a tensor with gaps is quantized into a new one."""
    qmin, qmax, zp = grid
    x = _input(shape, "contiguous") * (1.0 / 0.37)  # ties of the 0.37 grid
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "gaps":
        x = torch.cat([x, x], dim=-1)[..., : shape[-1]]
    scale, zero_point = torch.tensor(0.37), torch.tensor(zp, dtype=torch.int32)
    ref_out, ref_mask = _reference(x, scale, zero_point, qmin, qmax, True)
    version, original = x._version, x.clone()
    result = fake_quantize_compiled(x, scale, zero_point, qmin, qmax, True, in_place=True)
    assert result is not None, "the compiled pass was not used"
    out, mask = result
    assert torch.equal(out.nan_to_num(nan=1e9), ref_out.nan_to_num(nan=1e9))
    assert torch.equal(mask.bool(), ref_mask)
    if layout == "gaps":
        assert out is not x and torch.equal(x.nan_to_num(nan=1e9), original.nan_to_num(nan=1e9))
    else:
        assert out is x and x._version > version  # autograd sees the write
        assert mask.stride() == x.stride()


def test_in_place_needs_the_relu_mask():
    """Without ``after_relu`` the caller has not said that it owns the input: not in place."""
    x = torch.randn(4, 8)
    scale, zero_point = torch.tensor(0.05), torch.tensor(0, dtype=torch.int32)
    out, _ = fake_quantize_compiled(x, scale, zero_point, -127, 127, False, in_place=True)
    assert out is not x


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_zero_unless_positive_is_a_relus_backward_written_over_the_gradient(layout):
    from lightning_qat.quant.compiled_kernels import zero_unless_positive

    x = _input((4, 6, 5, 5), layout).relu()  # zeros, NaN, inf as a ReLU outputs them
    grad = torch.randn(4, 6, 5, 5).to(memory_format=_format(layout))
    expected = torch.ops.aten.threshold_backward(grad, x, 0.0)
    version = grad._version
    out = zero_unless_positive(grad, x)
    assert out is grad and grad._version > version
    assert torch.equal(out, torch.where(x.isnan(), 0.0, expected))  # (NaN: never in range)
    # another layout: a new tensor, the gradient untouched
    other = torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last)
    if layout == "contiguous":
        copy_ = other.clone()
        out = zero_unless_positive(other, x)
        assert out is not other and torch.equal(other, copy_)
        assert torch.equal(out, torch.where(x > 0, other, 0.0))


def _format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format
