"""Multi-head attention quantized as an integer runtime runs it (issue 14): the same
function as torch's with the quantizers off, every projection and matmul on a grid with
them on, torch's fused fast path never taken, and what stays float named."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

from lightning_qat import QuantConfig, calibrate, plan_qat, prepare_qat, quantizers
from lightning_qat.callback import is_quantizer_key
from lightning_qat.nn import KeepModulePath, QuantLinear, QuantMultiheadAttention


def _fake_quant(model: nn.Module, enabled: bool) -> None:
    for _, quantizer in quantizers(model):
        quantizer.enable_fake_quant(enabled)


@pytest.mark.parametrize(
    "batch_first, mask", list(itertools.product([True, False], ["none", "bool", "float3d"]))
)
def test_quantizers_off_it_is_torchs_attention(batch_first, mask):
    torch.manual_seed(0)
    float_mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    mha = QuantMultiheadAttention.from_float(float_mha, QuantConfig()).eval()
    _fake_quant(mha, False)
    x = torch.randn(3, 5, 16)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    attn_mask = {
        "none": None,
        "bool": torch.ones(5, 5, dtype=torch.bool).triu(1),
        "float3d": torch.randn(3 * 4, 5, 5),
    }[mask]
    for average in (True, False):
        expected = float_mha(
            x, x, x, key_padding_mask=padding, attn_mask=attn_mask, average_attn_weights=average
        )
        got = mha(
            x, x, x, key_padding_mask=padding, attn_mask=attn_mask, average_attn_weights=average
        )
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-6)
    unbatched = x[0] if batch_first else x[:, 0]
    torch.testing.assert_close(
        mha(unbatched, unbatched, unbatched)[0],
        float_mha(unbatched, unbatched, unbatched)[0],
        rtol=0,
        atol=1e-6,
    )


def test_every_matmul_operand_is_on_its_grid():
    torch.manual_seed(0)
    mha = QuantMultiheadAttention(16, 2, batch_first=True, config=QuantConfig(activation_bits=4))
    seen = {}
    for name, quantizer in quantizers(mha):
        quantizer.register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, out))
    x = torch.randn(2, 6, 16)
    mha(x, x, x)  # training mode: the observers set the grids
    mha.eval()
    with torch.no_grad():
        mha(x, x, x)
    # the two matmuls' operands and the out_proj input: 4-bit grids, at most 15 levels
    for name in (
        "query_quantizer",
        "key_quantizer",
        "value_quantizer",
        "out_proj.activation_quantizer",
    ):
        quantizer = mha.get_submodule(name)
        codes = seen[name] / quantizer.scale
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert codes.round().unique().numel() <= 15, name
    probabilities = seen["attention_quantizer"]
    assert probabilities.min() >= 0 and probabilities.unique().numel() <= 16
    weight_codes = seen["weight_quantizer"] / mha.weight_quantizer.scale.reshape(-1, 1)
    assert torch.allclose(weight_codes, weight_codes.round(), atol=1e-3)


def test_attention_parameters_learn_through_the_quantizers():
    torch.manual_seed(0)
    mha = QuantMultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    mha(x, x, x)[0].square().sum().backward()
    assert mha.in_proj_weight.grad.abs().sum() > 0 and mha.in_proj_bias.grad.abs().sum() > 0
    assert mha.out_proj.weight.grad.abs().sum() > 0


def test_self_attention_is_refused_other_inputs():
    mha = QuantMultiheadAttention(8, 2, batch_first=True, self_attention=True)
    x, y = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="self_attention=False"):
        mha(x, y, y)


class _Encoder(nn.Module):
    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.embed = nn.Linear(6, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def _prepared_encoder(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = _Encoder(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LayerNorms are named; tested elsewhere
        return prepare_qat(model, QuantConfig())


def test_transformer_layers_convert_in_call_order_with_self_attention():
    model = _Encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_qat(model)
    assert plan.layers == [
        "embed",
        "encoder.layers.0.self_attn",
        "encoder.layers.0.linear1",
        "encoder.layers.0.linear2",
        "encoder.layers.1.self_attn",
        "encoder.layers.1.linear1",
        "encoder.layers.1.linear2",
        "head",
    ]
    assert plan.self_attention == {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn"}
    model = _prepared_encoder()
    attention = model.encoder.layers[0].self_attn
    assert isinstance(attention, QuantMultiheadAttention) and attention.self_attention
    assert isinstance(attention.out_proj, QuantLinear)
    assert not hasattr(attention, "key_input_quantizer")  # one input, one grid
    assert any(
        isinstance(h, KeepModulePath) for h in model.encoder.layers[0]._forward_pre_hooks.values()
    )


@pytest.mark.parametrize("norm_first", [False, True])
def test_eval_under_no_grad_runs_the_quantizers_not_the_fused_fast_path(norm_first):
    """The trap of issue 14: torch's fused encoder path skipped every quantizer in eval,
    so turning fake quantization off changed nothing."""
    model = _prepared_encoder(norm_first=norm_first)
    x = torch.randn(4, 5, 6)
    model(x)  # observe ranges
    model.eval()
    calls = []
    attention = model.encoder.layers[1].self_attn
    forward = attention.forward  # wrapped, not hooked: a hook turns the fast path off
    attention.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    with torch.no_grad():
        quantized = model(x)
        _fake_quant(model, False)
        float_out = model(x)
    assert len(calls) == 2  # the attention module ran, both times
    assert not torch.equal(quantized, float_out)


def test_decoder_cross_attention_quantizes_each_input():
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(16, 2, 32, 0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_qat(model, QuantConfig())
    assert model.self_attn.self_attention
    cross = model.multihead_attn
    assert not cross.self_attention
    assert hasattr(cross, "key_input_quantizer") and hasattr(cross, "value_input_quantizer")
    tgt, memory = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    out = model(tgt, memory)
    assert out.shape == (2, 3, 16)
    assert cross.key_input_quantizer.observer.max_val > 0  # it saw the memory


def test_calibrate_reaches_every_attention_quantizer():
    """It failed with 'out_proj saw no data (empty dataloader?)': MultiheadAttention
    reads out_proj's weight without calling it."""
    model = _prepared_encoder()
    batches = [(torch.randn(4, 5, 6), None) for _ in range(2)]
    calibrate(model, batches, "minmax", 2)
    mha = model.encoder.layers[0].self_attn
    for name in ("attention_quantizer", "query_quantizer", "out_proj.activation_quantizer"):
        assert mha.get_submodule(name).scale > 0


def test_calibrate_names_quantizers_the_forward_never_calls():
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x) + nn.functional.linear(x, self.unused.weight)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prepare_qat(Bypass(), QuantConfig())
    with pytest.raises(ValueError, match=r"unused\.activation_quantizer saw no data while"):
        calibrate(model, [(torch.randn(2, 4), None)], "minmax", 1)
    with pytest.raises(ValueError, match="empty dataloader"):
        calibrate(model, [], "minmax", 1)


def test_prepared_transformer_state_dict_round_trips():
    model = _prepared_encoder()
    x = torch.randn(4, 5, 6)
    model(x)
    state = model.state_dict()
    assert is_quantizer_key("encoder.layers.0.self_attn.attention_quantizer.scale")
    assert is_quantizer_key("encoder.layers.0.self_attn.out_proj.weight_quantizer.scale")
    assert not is_quantizer_key("encoder.layers.0.self_attn.in_proj_weight")
    fresh = _prepared_encoder()
    fresh.load_state_dict(state)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_unsupported_attention_stays_float_and_is_named():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, q, kv):
            return self.head(self.attn(q, kv, kv)[0])

    with pytest.warns(UserWarning, match=r"attn \(MultiheadAttention\): attention with kdim"):
        model = prepare_qat(Cross(), QuantConfig())
    assert type(model.attn) is nn.MultiheadAttention
    with pytest.raises(ValueError, match=r"strict.*attn \(MultiheadAttention\)"):
        plan_qat(Cross(), QuantConfig(strict=True))
    with pytest.warns(UserWarning, match="excluded"):
        plan = plan_qat(Cross(), QuantConfig(strict=True, exclude=["attn"]))
    assert plan.layers == ["head"]
    assert type(model.attn.out_proj) is not QuantLinear  # never called: left alone
