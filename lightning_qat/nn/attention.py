"""`QuantMultiheadAttention`: multi-head attention as an integer runtime runs it."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qat.nn.layer import QuantizedLayerMixin
from lightning_qat.nn.linear import QuantLinear
from lightning_qat.nn.pruning import adopt_tensor
from lightning_qat.quant import FakeQuantize, QuantConfig, quantize_bias


def attention_unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be quantized (it then stays float, named), or ``None``."""
    if not mha._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v projections)"
    if mha.bias_k is not None:
        return "add_bias_kv=True"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    return None


class QuantMultiheadAttention(QuantizedLayerMixin, nn.MultiheadAttention):
    """Multi-head attention with every matmul on integer operands (DESIGN.md section 6).

    Vaswani et al. 2017, section 3.2: ``softmax(Q K^T / sqrt(d)) V`` per head, with
    ``Q, K, V`` the input projections and an output projection after. An integer runtime
    (onnxruntime's QLinearMatMul / MatMulInteger, as its QDQ quantizer places them, and
    I-BERT, Kim et al. 2021, section 3) runs

    - the input projection on the quantized input and weight:
      ``[Q|K|V] = Q_a(x) Q_w(W_in)^T + Q_b(b_in)`` (the bias on the int32 grid
      ``s_x s_w``, per block of ``W_in`` with its own input's scale);
    - the first attention matmul on ``Q_q(Q / sqrt(d))`` and ``Q_k(K)`` (the ``1/sqrt(d)``
      folds into the requantization of the projection, exactly), its int32 scores
      dequantized for the mask and the softmax, which stay float (a float island);
    - the second matmul on ``Q_p(softmax)`` (probabilities on their own unsigned grid over
      ``[0, 1]``) and ``Q_v(V)``;
    - the output projection, a `QuantLinear` (``out_proj``) quantizing its own input.

    This ``forward`` computes exactly that, in eval as in training: no fused fast path
    (``torch._native_multi_head_attention``) that would skip the quantizers.

    Quantizers: ``activation_quantizer`` (the query input; in self-attention the key and
    value inputs are the same tensor and share it), ``key_input_quantizer`` and
    ``value_input_quantizer`` (cross-attention only), ``weight_quantizer`` (``W_in``, per
    row where per-channel), ``query_quantizer``, ``key_quantizer``, ``value_quantizer``,
    ``attention_quantizer``.

    Args: as `nn.MultiheadAttention` (separate ``kdim``/``vdim``, ``add_bias_kv`` and
    ``add_zero_attn`` are not supported), plus
        config: the quantization scheme.
        quantize_input: fake-quantize the query input (its range is observed either way).
        self_attention: the module is called as ``mha(x, x, x)``: one input quantizer.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *args,
        config: QuantConfig | None = None,
        quantize_input: bool = True,
        self_attention: bool = True,
        **kwargs,
    ):
        super().__init__(embed_dim, num_heads, *args, **kwargs)
        reason = attention_unsupported(self)
        if reason is not None:
            raise ValueError(f"QuantMultiheadAttention: {reason} is not supported")
        config = config or QuantConfig()
        self._init_quantizers(config, quantize_input, 3 * embed_dim)
        self.bias_grid_refinement = 1  # (`QuantConfig.fine_bias_grid`: convolutions, linears)
        device = self.in_proj_weight.device
        self.self_attention = self_attention
        if not self_attention:
            self.key_input_quantizer = FakeQuantize.for_activations(config).to(device)
            self.value_input_quantizer = FakeQuantize.for_activations(config).to(device)
        self.query_quantizer = FakeQuantize.for_activations(config).to(device)
        self.key_quantizer = FakeQuantize.for_activations(config).to(device)
        self.value_quantizer = FakeQuantize.for_activations(config).to(device)
        # probabilities lie in [0, 1]: an unsigned grid spends every code on them
        unsigned = replace(config, activation_symmetric=False)
        self.attention_quantizer = FakeQuantize.for_activations(unsigned).to(device)
        self.out_proj = QuantLinear.from_float(self.out_proj, config)

    @property
    def weight(self) -> torch.Tensor:
        """The input projection's weight ``W_in`` ``[3E, E]``, as other layers name theirs."""
        return self.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The input projection's bias."""
        return self.in_proj_bias

    @classmethod
    def from_float(
        cls,
        mha: nn.MultiheadAttention,
        config: QuantConfig,
        quantize_input: bool = True,
        self_attention: bool = True,
    ) -> QuantMultiheadAttention:
        """A `QuantMultiheadAttention` holding the very same Parameters as ``mha`` (the
        output projection becomes a `QuantLinear` holding its Parameters)."""
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            device=mha.in_proj_weight.device,
            dtype=mha.in_proj_weight.dtype,
            config=config,
            quantize_input=quantize_input,
            self_attention=self_attention,
        )
        adopt_tensor(new, mha, "in_proj_weight")
        adopt_tensor(new, mha, "in_proj_bias")
        out_proj = mha.out_proj
        if not isinstance(out_proj, QuantLinear):
            out_proj = QuantLinear.from_float(out_proj, config)
        new.out_proj = out_proj
        new.train(mha.training)
        return new

    def _projection_bias(self, input_scales: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The Q, K, V blocks of ``b_in``, each on the int32 grid of its input's scale."""
        bias = self.in_proj_bias
        if bias is None:
            return [None] * 3
        blocks = list(bias.chunk(3))
        if not self.weight_quantizer.fake_quant_enabled:
            return blocks
        weight_scale = self.weight_quantizer.scale
        weight_scales = weight_scale.chunk(3) if weight_scale.dim() else [weight_scale] * 3
        return [
            quantize_bias(b, s_x, s_w)
            for b, s_x, s_w in zip(blocks, input_scales, weight_scales, strict=True)
        ]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.self_attention and not (key is query and value is query):
            raise ValueError(
                "QuantMultiheadAttention(self_attention=True) was called with key or value "
                "other than the query; prepare it with self_attention=False"
            )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        batched = query.dim() == 3
        if not batched:  # [L, E] -> [1, L, E]
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # [L, B, E] -> [B, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))

        x_q = self.input_on_grid(query)
        if self.self_attention:
            x_k = x_v = x_q
            input_scales = [self.activation_quantizer.scale] * 3
        else:
            x_k, x_v = self.key_input_quantizer(key), self.value_input_quantizer(value)
            input_scales = [
                self.activation_quantizer.scale,
                self.key_input_quantizer.scale,
                self.value_input_quantizer.scale,
            ]
        w_q, w_k, w_v = self.weight_quantizer(self.in_proj_weight).chunk(3)
        b_q, b_k, b_v = self._projection_bias(input_scales)
        q = self.query_quantizer(F.linear(x_q, w_q, b_q) * self.head_dim**-0.5)
        k = self.key_quantizer(F.linear(x_k, w_k, b_k))
        v = self.value_quantizer(F.linear(x_v, w_v, b_v))

        batch, target, source = q.shape[0], q.shape[1], k.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (
            t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v)
        )  # [B, H, L, d]
        scores = q @ k.transpose(-2, -1)  # [B, H, L, S], the int32 accumulator dequantized
        if attn_mask is not None:  # [L, S], or [B * H, L, S]
            mask = _additive(attn_mask, scores.dtype)
            scores = scores + (mask.reshape(scores.shape) if mask.dim() == 3 else mask)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype).reshape(batch, 1, 1, source)
        probabilities = self.attention_quantizer(torch.softmax(scores, dim=-1))
        if self.training and self.dropout > 0:
            probabilities = F.dropout(probabilities, self.dropout)
        out = (probabilities @ v).transpose(1, 2).reshape(batch, target, heads * head_dim)
        out = self.out_proj(out)

        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = probabilities.mean(dim=1) if average_attn_weights else probabilities
        return out, weights if batched else weights.squeeze(0)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (``True``: not attended) as ``-inf``/``0``; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, -math.inf)
    return mask.to(dtype)


class KeepModulePath:
    """Forward pre-hook that does nothing, registered by `prepare_qat` on each torch
    ``TransformerEncoderLayer`` whose attention it quantized.

    Under ``torch.no_grad()`` (validation, test, inference) the layer would otherwise run
    its fused fast path (``torch._transformer_encoder_layer_fwd``), which reads the float
    weights of the attention and the feed-forward Linears directly and skips every
    quantizer: the "quantized" accuracy would be float accuracy. torch takes that path
    only when no hook is attached to the layer or its children (the documented
    conditions of ``TransformerEncoderLayer.forward``); this hook is that condition, with
    no global switch (``torch.backends.mha.set_fastpath_enabled``) flipped for the whole
    process. A plain class, so that models holding it pickle and deep-copy.
    """

    def __call__(self, module: nn.Module, args: tuple) -> None:
        return None

    def __repr__(self) -> str:
        return "KeepModulePath()"


def keep_module_paths(model: nn.Module) -> None:
    """Turn off the fused fast paths of torch's transformer modules in ``model`` whose
    attention is quantized (see `KeepModulePath`); ``TransformerEncoder`` stops packing
    padded batches into nested tensors (``use_nested_tensor``), which only that fast
    path reads."""
    for module in model.modules():
        quantized = isinstance(getattr(module, "self_attn", None), QuantMultiheadAttention)
        if isinstance(module, nn.TransformerEncoderLayer) and quantized:
            hooks = module._forward_pre_hooks.values()
            if not any(isinstance(h, KeepModulePath) for h in hooks):
                module.register_forward_pre_hook(KeepModulePath())
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(layer.self_attn, QuantMultiheadAttention) for layer in module.layers
        ):
            module.use_nested_tensor = False
