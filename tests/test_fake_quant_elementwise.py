"""`fake_quantize_elementwise` (the per-tensor fake quantization that torch.compile sees)
computes bit for bit what torch's fused kernel computes in eager mode: output and mask,
on the inputs where a rewrite would most likely differ (ties, grid edges, NaN, infinities,
values far outside the grid), at every width and zero point the library uses."""

import pytest
import torch

from lightning_qat import QuantConfig, prepare_qat, quantizers
from lightning_qat.app.models import resnet20
from lightning_qat.quant.fake_quantize import fake_quantize_elementwise

GRIDS = [  # (scale, zero point, qmin, qmax)
    (0.0123, 0, -127, 127),  # 8-bit symmetric, narrow
    (0.0371, -128, -128, 127),  # 8-bit asymmetric on a ReLU output: zero at qmin
    (0.25, 3, -8, 7),  # 4-bit asymmetric
    (1.7, -1, -2, 1),  # 2-bit
    (3.0e-6, 17, -128, 127),  # tiny scale: most values far out of range
]


def _hard_inputs(scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    codes = torch.arange(qmin - 3, qmax + 4, dtype=torch.float32) - zero_point
    ties = (codes + 0.5) * scale  # round half to even decides these
    near_ties = torch.cat([torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 0.0, -0.0])
    random = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * scale * (qmax - qmin)
    return torch.cat([codes * scale, ties, near_ties, special, random])


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"s{g[0]}_z{g[1]}_{g[2]}..{g[3]}")
def test_equals_the_fused_kernel_bit_for_bit(grid):
    scale_value, zero_value, qmin, qmax = grid
    x = _hard_inputs(*grid)
    scale = torch.tensor(scale_value)
    zero_point = torch.tensor(zero_value, dtype=torch.int32)
    enabled = torch.ones(1, dtype=torch.long)
    expected, expected_mask = (
        torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, scale, zero_point, enabled, qmin, qmax
        )
    )
    out, mask = fake_quantize_elementwise(x, scale, zero_point, qmin, qmax)
    assert torch.equal(mask, expected_mask)
    # bitwise, so that -0.0 against 0.0 or one ulp would fail too
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


def test_a_compiled_training_step_uses_it_and_matches_eager():
    """Under torch.compile the activation quantizers take the elementwise path (the
    aten kernel would not appear in the graph) and the step's outputs and gradients equal
    eager's bit for bit."""
    config = QuantConfig(symmetric=False)
    torch.manual_seed(0)
    eager = prepare_qat(resnet20(), config).train()
    compiled_model = prepare_qat(resnet20(), config).train()
    compiled_model.load_state_dict(eager.state_dict())
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(4, 3, 32, 32)
    for model in (eager, compiled):
        model(x).square().mean().backward()
    code = "\n".join(g.code for g in graphs)
    assert "cachemask_tensor_qparams" not in code
    assert "round" in code
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert torch.equal(p_e.grad, p_c.grad), name
    for (name, q_e), (_, q_c) in zip(quantizers(eager), quantizers(compiled_model), strict=True):
        assert torch.equal(q_e.scale, q_c.scale), name
