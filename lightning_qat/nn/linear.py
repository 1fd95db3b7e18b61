"""`QuantLinear`: a Linear layer with fake-quantized input and weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qat.nn.layer import QuantizedLayerMixin
from lightning_qat.nn.pruning import adopt_tensor
from lightning_qat.quant import QuantConfig


class QuantLinear(QuantizedLayerMixin, nn.Linear):
    """``y = Q_w(W) Q_a(x) + b``: input and weight fake-quantized, bias in float.

    The bias stays float during training: in the integer model it becomes int32 with
    scale ``s_x * s_w`` (Jacob et al. 2018, section 2.4), far finer than the activations.

    Args:
        config: the quantization scheme (bits, symmetric, per-channel, observer).
        quantize_input: fake-quantize the input; when ``False`` the input range is still
            observed (the integer model needs it) but the input stays float.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: QuantConfig | None = None,
        quantize_input: bool = True,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantizers(config, quantize_input, out_features)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, config: QuantConfig, quantize_input: bool = True
    ) -> QuantLinear:
        """A `QuantLinear` holding the very same Parameter objects as ``linear``."""
        new = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            config=config,
            quantize_input=quantize_input,
        )
        adopt_tensor(new, linear, "weight")  # pruned weights stay pruned
        adopt_tensor(new, linear, "bias")
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_on_grid(x)
        weight = self.weight_quantizer(self.weight)
        return F.linear(x, weight, self.quantized_bias(self.bias))
