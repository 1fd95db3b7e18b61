"""`QuantConv2d`: a Conv2d layer with fake-quantized input and weight."""

from __future__ import annotations

import torch
from torch import nn

from lightning_qat.quant import FakeQuantize, QuantConfig


def conv2d_kwargs(conv: nn.Conv2d) -> dict:
    """Constructor arguments that rebuild ``conv``'s geometry (any groups, padding mode)."""
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


class QuantConv2d(nn.Conv2d):
    """``y = conv(Q_a(x), Q_w(W)) + b``: input and weight fake-quantized, bias in float.

    Weights are quantized per output channel (axis 0) when the config says so, which also
    covers grouped and depthwise convolutions (one scale per filter).

    Args: as `nn.Conv2d`, plus
        config: the quantization scheme.
        quantize_input: fake-quantize the input; when ``False`` its range is still observed.
    """

    def __init__(
        self, *args, config: QuantConfig | None = None, quantize_input: bool = True, **kwargs
    ):
        super().__init__(*args, **kwargs)
        config = config or QuantConfig()
        self.activation_quantizer = FakeQuantize.for_activations(config).enable_fake_quant(
            quantize_input
        )
        self.weight_quantizer = FakeQuantize.for_weights(config, self.out_channels)
        self.activation_quantizer.to(self.weight.device)
        self.weight_quantizer.to(self.weight.device)

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, config: QuantConfig, quantize_input: bool = True
    ) -> QuantConv2d:
        """A `QuantConv2d` holding the very same Parameter objects as ``conv``."""
        new = cls(**conv2d_kwargs(conv), config=config, quantize_input=quantize_input)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def weight_to_quantize(self) -> torch.Tensor:
        """The float weight the weight quantizer sees."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            self.activation_quantizer(x), self.weight_quantizer(self.weight), self.bias
        )
