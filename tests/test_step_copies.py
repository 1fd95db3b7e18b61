"""A QAT training step of a channels_last model copies no activation that the FP32 step
does not copy: the observers read each activation where it lies (``torch.aminmax`` of a
channels_last tensor copied it to contiguous first: one extra read and write of every
activation per step, about a tenth of a NIN step on the bench's CPU)."""

import math

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.app.models import NIN
from lightning_qat.quant.layout import flat_in_memory_order
from lightning_qat.quant.observer import MovingAverageMinMaxObserver

WIDTHS = [24, 16, 12, 24, 24, 24, 24, 24]
BATCH = 16  # the smallest activation outsizes every weight (a weight may be copied)
COPIES = {"aten::copy_", "aten::clone"}


def _copies_in_a_step(model: nn.Module) -> int:
    """Copies of activation-sized tensors in a training step (torch.profiler sees the
    copies that aten kernels make inside themselves, which a dispatch mode does not)."""
    model = model.train().to(memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, 32, 32).to(memory_format=torch.channels_last)
    nn.functional.cross_entropy(model(x), torch.zeros(BATCH, dtype=torch.long)).backward()
    smallest_activation = BATCH * 12 * 8 * 8
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), torch.zeros(BATCH, dtype=torch.long)).backward()
    return sum(
        1
        for event in profiler.events()
        if event.name in COPIES
        and event.input_shapes
        and math.prod(event.input_shapes[0]) >= smallest_activation
    )


@pytest.mark.parametrize(
    "config",
    [QuantConfig(), QuantConfig(symmetric=False, bn_fold=False), QuantConfig(learn_scale=True)],
    ids=["sym_folded", "asym_unfolded", "lsq"],
)
def test_a_channels_last_qat_step_copies_no_more_activations_than_fp32(config):
    torch.manual_seed(0)
    fp32 = _copies_in_a_step(NIN(widths=WIDTHS))
    qat = _copies_in_a_step(prepare_qat(NIN(widths=WIDTHS), config))
    assert qat == fp32


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_the_observer_reads_in_memory_order_without_copying(memory_format):
    x = torch.randn(4, 6, 5, 7).to(memory_format=memory_format)
    flat = flat_in_memory_order(x)
    assert flat.data_ptr() == x.data_ptr() and flat.numel() == x.numel()
    observer = MovingAverageMinMaxObserver(momentum=1.0)
    observer(x)
    assert observer.min_val == x.min() and observer.max_val == x.max()


def test_a_tensor_with_gaps_is_copied_in_logical_order():
    x = torch.randn(4, 6, 8)[:, :, ::2]
    assert torch.equal(flat_in_memory_order(x), x.reshape(-1))
