"""What inductor generates for a compiled QAT training step on CPU: the two patterns that
made a compiled NIN step 1.7x the compiled FP32 step (``bench/qat_overhead.py --compile``)
must not come back.

- A bool tensor written by a vectorized loop: inductor stores it element by element
  (27 ms for the mask of a 25 MB activation on 2 cores, against 0.85 ms as uint8); the
  straight-through masks are kept as uint8 under compile (`mask_for_backward`).
- An activation read through a flat index with a division and a modulo: ``reshape(-1)``
  of a channels_last tensor is read in logical order, one scalar gather per element, by
  the observers' min/max (`flat_in_memory_order` reads it in memory order).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.quant.layout import memory_order


def _kernels(config: QuantConfig) -> list[str]:
    """The C++ kernels of one compiled forward and backward of Conv-BN-ReLU-Conv-BN (every
    ReLU joined to the quantizer reading it), channels_last."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
    )
    model = prepare_qat(model, config).train().to(memory_format=torch.channels_last)
    x = torch.randn(4, 8, 8, 8).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(model)

    def step() -> None:
        compiled(x).square().sum().backward()

    _, sources = run_and_get_code(step)
    # nn.Sequential.forward's cache entries would count against later tests' compilations
    torch._dynamo.reset()
    assert sources, "nothing was compiled"
    return [k for source in sources for k in re.findall(r'extern "C".*?\n\}\n', source, re.S)]


CONFIGS = {
    "observers": QuantConfig(),
    "asymmetric": QuantConfig(symmetric=False),
    "learned steps": QuantConfig(weight_bits=4, activation_bits=4, learn_scale=True),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_no_bool_tensor_is_written_by_a_compiled_qat_step(config: QuantConfig) -> None:
    stores = []
    for kernel in _kernels(config):
        for pointer in re.findall(r"bool\* (out_ptr\d+)", kernel):
            stores += re.findall(rf"\w+\.store\({pointer}\b.*", kernel)
    assert stores == []


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_no_activation_is_read_through_a_modulo_index(config: QuantConfig) -> None:
    gathers = [
        line.strip()
        for kernel in _kernels(config)
        for line in kernel.splitlines()
        if re.search(r"(in|out)_ptr\d+\[.*%", line)
    ]
    assert gathers == []


def test_memory_order_goes_from_the_outermost_dimension_inwards() -> None:
    t = torch.empty(2, 3, 4, 5)
    assert memory_order(t) == [0, 1, 2, 3]
    assert memory_order(t.to(memory_format=torch.channels_last)) == [0, 2, 3, 1]
    assert memory_order(t.permute(3, 1, 0, 2)) == [2, 1, 3, 0]
