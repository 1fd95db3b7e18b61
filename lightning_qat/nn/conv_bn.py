"""`QuantConvBn2d` (Conv2d + BatchNorm2d) and `QuantConvBn1d` (Conv1d + BatchNorm1d),
trained with the BatchNorm folded into the weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_qat.nn.conv import conv_kwargs
from lightning_qat.nn.folded_bn import FoldedBatchNorm2d
from lightning_qat.nn.layer import QuantizedLayerMixin
from lightning_qat.nn.pruning import adopt_tensor, apply_pruning
from lightning_qat.quant import QuantConfig


class QuantConvBnMixin(QuantizedLayerMixin):
    """Convolution with BatchNorm folded in, as the integer model will run it (any
    number of spatial dimensions: the formulas are per output channel).

    Krishnamoorthi 2018 (arXiv 1806.08342), section 3.2.2 and figures 8-9; Jacob et al.
    2018, section 3.2. With ``γ, β, μ, σ² `` the BatchNorm parameters and statistics,
    ``σ = sqrt(σ² + eps)`` and ``f = γ / σ_running`` per output channel:

    - the weights are folded with the *running* statistics before quantization,
      ``w_fold = w · f``, and quantized (per channel): ``Q(w_fold)``;
    - before the BN freeze, in training: the output is corrected to batch statistics,
      ``y = (σ_running / σ_batch) · conv(x, Q(w_fold)) + (β - γ μ_batch / σ_batch)``,
      and the running statistics are updated;
    - after the freeze, and in eval: running statistics only,
      ``y = conv(x, Q(w_fold)) + Q_b(β - γ μ_running / σ_running)``: exactly what the
      integer model computes (conv bias ``b``, if any, folds in as ``+ (b - μ) · f``;
      ``Q_b`` puts the folded bias on the accumulator's int32 grid, scale ``s_x s_w``).

    The batch statistics are those of ``z = conv(x, Q(w_fold)) / f + b``, i.e. of the
    float convolution up to weight-quantization error, and ``BN_batch(z)`` is the corrected
    output above (algebra: ``γ (z - μ_B) / σ_B + β``). So the correction costs one
    convolution, not the two of figure 8 (torch.ao's ``ConvBn2d`` does the same).

    With learned step sizes in the weight's units (``QuantConfig(learn_scale=True,
    folded_step_units="weight")``) the quantizer learns the step ``s`` of ``w`` and the
    folded weight is quantized on the grid ``s |f|`` per output channel:
    ``Q(w_fold) = f · s · round(w / s) = f · Q(w)`` (codes mirrored where ``f < 0``, as
    the export writes them). Its codes no longer move when the running statistics or
    ``γ`` move ``f``, the batch-corrected output is ``BN_batch(conv(x, Q(w)) + b)``
    (the unfolded layer's, LSQ on ``w``), and after the freeze and in eval the layer
    computes, and deploys, ``conv(x, f · Q(w)) + Q_b(folded bias)`` with the bias on the
    int32 grid of scale ``s_x s |f|``.

    ``bn`` is the `FoldedBatchNorm2d` holding the BatchNorm's Parameters and statistics.
    After `prepare_qat` it stays registered where the BatchNorm stood (same state_dict
    keys, same parameter order) and this layer only refers to it; a layer built on its own
    (``QuantConvBn2d(...)`` or ``from_float`` with a plain BatchNorm2d) owns it as a child.
    """

    def __init__(
        self,
        *args: Any,
        bn: FoldedBatchNorm2d | _BatchNorm | None = None,
        config: QuantConfig | None = None,
        quantize_input: bool = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if bn is None:
            bn = self._bn_class(
                self.out_channels, device=self.weight.device, dtype=self.weight.dtype
            )
        if isinstance(bn, FoldedBatchNorm2d):
            # Registered elsewhere (where the BatchNorm stood): refer to it, don't own it.
            object.__setattr__(self, "bn", bn)
        else:
            self.bn = FoldedBatchNorm2d(bn)
        if self.bn.num_features != self.out_channels:
            raise ValueError(
                f"the BatchNorm has {self.bn.num_features} features but the conv "
                f"has {self.out_channels} output channels"
            )
        self._init_quantizers(config, quantize_input, self.out_channels)
        self.bn_frozen = False
        config = config or QuantConfig()
        #: the weight quantizer learns the step of ``w``, not of ``w · f`` (see the class
        #: docstring); part of the layer's state, so a checkpoint restores it
        self.step_in_weight_units = config.learn_scale and config.folded_step_units == "weight"

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        bn: FoldedBatchNorm2d | _BatchNorm,
        config: QuantConfig,
        quantize_input: bool = True,
    ) -> QuantConvBnMixin:
        """A `QuantConvBn2d` holding the very same Parameters as ``conv`` and ``bn``."""
        new = cls(**conv_kwargs(conv), bn=bn, config=config, quantize_input=quantize_input)
        adopt_tensor(new, conv, "weight")  # pruned weights stay pruned
        adopt_tensor(new, conv, "bias")
        new.train(conv.training)
        return new

    def freeze_bn(self, frozen: bool = True) -> QuantConvBnMixin:
        """Stop (or resume) batch statistics: use and keep the running ones."""
        self.bn_frozen = frozen
        return self

    def fold_factor(self) -> torch.Tensor:
        """``f = γ / sqrt(σ²_running + eps)`` per output channel."""
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        return inv_std if bn.weight is None else bn.weight * inv_std

    def folded_bias(self, factor: torch.Tensor) -> torch.Tensor:
        """``β + (b - μ_running) · f``, the bias of the folded convolution."""
        bn = self.bn
        shift = -bn.running_mean if self.bias is None else self.bias - bn.running_mean
        bias = shift * factor
        return bias if bn.bias is None else bias + bn.bias

    def _per_channel(self, values: torch.Tensor) -> torch.Tensor:
        """Per-output-channel ``values`` shaped to scale the weight."""
        return values.reshape(-1, *[1] * (self.weight.dim() - 1))

    def _per_map(self, values: torch.Tensor) -> torch.Tensor:
        """Per-output-channel ``values`` shaped to scale the output ``[N, C, ...]``."""
        return values.reshape(1, -1, *[1] * (self.weight.dim() - 2))

    def weight_to_quantize(self) -> torch.Tensor:
        """The weight the weight quantizer sees: the folded weight ``w · f`` (running
        statistics), or ``w`` where its step is learned in the weight's units."""
        if self.step_in_weight_units:
            return self.weight
        return self.weight * self._per_channel(self.fold_factor())

    def folded_weight_scale(self, factor: torch.Tensor) -> torch.Tensor | None:
        """The folded weight's per-channel scales where they are not the quantizer's:
        ``s |f|`` in the weight's units (``s`` where ``f = 0``: a channel with no output
        keeps its scale, as the export does), None otherwise."""
        if not self.step_in_weight_units:
            return None
        magnitude = factor.abs()
        magnitude = torch.where(magnitude == 0, torch.ones_like(magnitude), magnitude)
        return self.weight_quantizer.scale.reshape(-1) * magnitude

    def quantized_folded_weight(self, factor: torch.Tensor) -> torch.Tensor:
        """``Q(w · f)`` on the folded weight's grid: ``f · Q(w)`` in the weight's units."""
        if self.step_in_weight_units:
            return self.weight_quantizer(self.weight) * self._per_channel(factor)
        return self.weight_quantizer(self.weight * self._per_channel(factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a pruned BN's weight is set by its own hook when the BN is called, after this
        # layer: recompute it now (nothing to do for an unpruned BN)
        apply_pruning(self.bn)
        x = self.input_on_grid(x)
        if not self.training or self.bn_frozen:
            factor = self.fold_factor()
            weight = self.quantized_folded_weight(factor)
            scale = self.folded_weight_scale(factor)
            bias = self.quantized_bias(self.folded_bias(factor), scale)
            return self._conv_forward(x, weight, bias)
        # Before the freeze, z = conv(x, Q(w·f)) / f equals conv(x, w) in float arithmetic,
        # whatever γ is: the fold and the division cancel. So f is a constant for autograd
        # here; γ gets its gradient through BN alone, as in the float Conv->BN, and the
        # division's gradient (two full-size passes per layer) is never computed.
        factor = self.fold_factor().detach()
        if torch.compiler.is_compiling():
            factor = _saved_for_backward(factor)
        weight = self.quantized_folded_weight(factor)
        y = self._conv_forward(x, weight, None)
        # γ = 0 makes f = 0 and Q(w_fold) = 0; dividing by 1 instead keeps z finite and BN
        # then outputs β, as the float Conv->BN would.
        inv_factor = 1 / torch.where(factor == 0, torch.ones_like(factor), factor)
        # z = y / f (+ b) written over y: the convolution's backward does not need its output
        bias = None if self.bias is None else self._per_map(self.bias)
        return self.bn.normalize_rescaled(y, self._per_map(inv_factor), bias)

    def get_extra_state(self) -> dict[str, Any]:
        return {"bn_frozen": self.bn_frozen, "step_in_weight_units": self.step_in_weight_units}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bn_frozen = bool(state["bn_frozen"])
        # checkpoints from before the option learned in the folded weight's units
        self.step_in_weight_units = bool(state.get("step_in_weight_units", False))

    def extra_repr(self) -> str:
        units = ", step_in_weight_units=True" if self.step_in_weight_units else ""
        return super().extra_repr() + f", bn_frozen={self.bn_frozen}{units}"


def _saved_for_backward(factor: torch.Tensor) -> torch.Tensor:
    """``factor`` itself, through an op that AOTAutograd's min-cut partitioner does not
    recompute in the backward (``aten.cat`` is not on its list of recomputable ops).

    ``f`` is read from the running variance before the BatchNorm updates it, in the same
    forward. Compiled with inductor, the partitioner recomputed ``f`` in the backward from
    the buffer, which by then held the updated statistics: every weight gradient was off
    by ``f_new / f_old`` per channel (the step's update of the statistics), silently
    (pytorch/pytorch PR 197039, "Don't recompute reads of mutated inputs or mutable
    buffers", open, is the fix in torch). Saved, ``f`` is the value the forward used."""
    # (a cat of one tensor, or of a tensor with itself, is simplified into recomputable
    # ops before partitioning; the slice is recomputed from the saved cat)
    return torch.cat([factor, factor.new_zeros(1)])[: factor.shape[0]]


class QuantConvBn2d(QuantConvBnMixin, nn.Conv2d):
    __doc__ = QuantConvBnMixin.__doc__
    _bn_class = nn.BatchNorm2d


class QuantConvBn1d(QuantConvBnMixin, nn.Conv1d):
    __doc__ = QuantConvBnMixin.__doc__
    _bn_class = nn.BatchNorm1d
