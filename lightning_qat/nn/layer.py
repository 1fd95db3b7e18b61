"""What every quantized layer does with its input and its bias."""

from __future__ import annotations

import torch

from lightning_qat.quant import FakeQuantize, quantize_bias


class QuantizedLayerMixin:
    """Input and bias handling shared by `QuantConv2d`, `QuantConvBn2d`, `QuantLinear`.

    Expects ``activation_quantizer``, ``weight_quantizer`` and
    ``input_quantized_upstream`` on the layer.
    """

    activation_quantizer: FakeQuantize
    weight_quantizer: FakeQuantize
    input_quantized_upstream: bool

    def input_on_grid(self, x: torch.Tensor) -> torch.Tensor:
        """The input on its grid: quantized here, or already upstream."""
        return x if self.input_quantized_upstream else self.activation_quantizer(x)

    def quantized_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias as the integer model adds it: on the int32 grid of scale ``s_x s_w``
        (`lightning_qat.quant.quantize_bias`), once the weights are fake-quantized (call
        after the weight quantizer, whose scales it reads)."""
        if bias is None or not self.weight_quantizer.fake_quant_enabled:
            return bias
        return quantize_bias(bias, self.activation_quantizer.scale, self.weight_quantizer.scale)
