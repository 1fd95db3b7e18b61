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

import copy
import re

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from lightning_qat import QuantConfig, prepare_qat, quantizers
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


def _folded_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
    )
    return prepare_qat(model, QuantConfig()).train().to(memory_format=torch.channels_last)


#: not a function of the last BN's output alone, whose sum of squares BN fixes (the
#: gradients would be rounding noise)
_LOSS_WEIGHTS = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out * _LOSS_WEIGHTS).sum()


@pytest.mark.parametrize("options", [None, {"realize_reads_threshold": 8}])
def test_compiled_folded_steps_compute_what_eager_computes(options: dict | None) -> None:
    """Inductor, as is and with the README's ``realize_reads_threshold`` advice. The fold
    factor is read from the running variance that the same forward updates: recomputed
    in the backward from the updated buffer, it had put every weight gradient off by
    ``f_new / f_old`` per channel (``_saved_for_backward``)."""
    eager = _folded_model()
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(4, 8, 8, 8).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, options=options)
    for _ in range(2):  # the second step reads the ranges the first one observed
        outs = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            out = m(x)
            _loss(out).backward()
            outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
        (out_e, grads_e), (out_c, grads_c) = outs
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        # (conv biases before a BN: zero but for rounding, so an absolute tolerance)
        atol = 1e-6 * max(float(g.abs().max()) for g in grads_e)
        for g_c, g_e in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=atol)
    torch._dynamo.reset()
    # (inductor's BatchNorm rounds otherwise than aten's: a range may move by an ulp)
    for (name, q_e), (_, q_c) in zip(quantizers(eager), quantizers(compiled_model), strict=True):
        torch.testing.assert_close(q_c.scale, q_e.scale, rtol=1e-6, atol=0, msg=name)


def test_recomputing_instead_of_storing_drops_activation_sized_buffers() -> None:
    """``torch.compile(model, options={"realize_reads_threshold": 8})``: inductor recomputes
    the BN+ReLU value that the observer's min/max and the quantization both read instead
    of storing it in a temporary activation-sized buffer (the README's advice under
    glibc's default allocator)."""
    x = torch.randn(4, 8, 8, 8).to(memory_format=torch.channels_last)
    buffers = {}
    for threshold in (None, 8):
        torch._dynamo.reset()
        options = None if threshold is None else {"realize_reads_threshold": threshold}
        step = torch.compile(_folded_model(), options=options)
        _, sources = run_and_get_code(lambda step=step: _loss(step(x)).backward())
        buffers[threshold] = len(re.findall(r"empty_strided_cpu\(\(4, 16, 8, 8\)", sources[0]))
    torch._dynamo.reset()
    assert buffers[8] < buffers[None]
