"""What every quantized layer does with its input and its bias."""

from __future__ import annotations

import torch

from lightning_qat.quant import FakeQuantize, QuantConfig, quantize_bias


class QuantizedLayerMixin:
    """Quantizers, input and bias handling shared by the quantized layers (`QuantConv2d`,
    `QuantConvBn2d`, `QuantLinear`, their 1-d and transposed kin, the attention).

    Expects ``activation_quantizer``, ``weight_quantizer`` and
    ``input_quantized_upstream`` on the layer (`_init_quantizers` sets them).
    """

    activation_quantizer: FakeQuantize
    weight_quantizer: FakeQuantize
    input_quantized_upstream: bool

    def _init_quantizers(
        self, config: QuantConfig | None, quantize_input: bool, out_channels: int
    ) -> None:
        """The input quantizer (fake-quantizing only with ``quantize_input``; observing
        either way, for export) and the weight quantizer (one scale per output channel
        where the config says so), on the weight's device."""
        config = config or QuantConfig()
        device = self.weight.device
        self.activation_quantizer = (
            FakeQuantize.for_activations(config).enable_fake_quant(quantize_input).to(device)
        )
        self.weight_quantizer = FakeQuantize.for_weights(config, out_channels).to(device)
        #: how much finer than ``s_x s_w`` the bias grid is (`QuantConfig.fine_bias_grid`)
        self.bias_grid_refinement = bias_grid_refinement(config)
        #: True where a quantizer upstream (the one ``activation_quantizer`` refers to)
        #: already put the input on its grid (set by `prepare_qat` on graphs where several
        #: ops read the tensor): the layer does not quantize it again.
        self.input_quantized_upstream = False

    def weight_to_quantize(self) -> torch.Tensor:
        """The float weight the weight quantizer sees, output channels first."""
        return self.weight

    def input_on_grid(self, x: torch.Tensor) -> torch.Tensor:
        """The input on its grid: quantized here, or already upstream."""
        return x if self.input_quantized_upstream else self.activation_quantizer(x)

    def quantized_bias(
        self, bias: torch.Tensor | None, weight_scale: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The bias as the integer model adds it: on the int32 grid of scale ``s_x s_w``
        (`lightning_qat.quant.quantize_bias`), once the weights are fake-quantized (call
        after the weight quantizer, whose scales it reads; ``weight_scale``: the scales
        of the weight the layer multiplies with, where they are not the quantizer's)."""
        if bias is None or not self.weight_quantizer.fake_quant_enabled:
            return bias
        if weight_scale is None:
            weight_scale = self.weight_quantizer.scale
        return quantize_bias(
            bias,
            self.activation_quantizer.scale,
            weight_scale,
            getattr(self, "bias_grid_refinement", 1),
        )


def bias_grid_refinement(config: QuantConfig) -> int:
    """``2^(8-b)`` for symmetric ``b``-bit weights with ``fine_bias_grid``, else 1: the
    factor by which the exported int8 weight codes are scaled up and the bias grid
    refined (see `QuantConfig.fine_bias_grid`)."""
    if not config.fine_bias_grid or not config.symmetric or config.weight_bits >= 8:
        return 1
    return 2 ** (8 - config.weight_bits)
