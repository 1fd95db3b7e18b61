"""`QuantConv2d`: a Conv2d layer with fake-quantized input and weight."""

from __future__ import annotations

import torch
from torch import nn

from lightning_qat.nn.layer import QuantizedLayerMixin
from lightning_qat.nn.pruning import adopt_tensor
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


class QuantConv2d(QuantizedLayerMixin, nn.Conv2d):
    """``y = conv(Q_a(x), Q_w(W)) + Q_b(b)``: input and weight fake-quantized, the bias on
    the accumulator's int32 grid (scale ``s_x s_w``).

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
        #: True where a quantizer upstream (the one ``activation_quantizer`` refers to)
        #: already put the input on its grid (set by `prepare_qat` on graphs where several
        #: ops read the tensor): the layer does not quantize it again.
        self.input_quantized_upstream = False

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, config: QuantConfig, quantize_input: bool = True
    ) -> QuantConv2d:
        """A `QuantConv2d` holding the very same Parameter objects as ``conv``."""
        new = cls(**conv2d_kwargs(conv), config=config, quantize_input=quantize_input)
        adopt_tensor(new, conv, "weight")  # pruned weights stay pruned
        adopt_tensor(new, conv, "bias")
        new.train(conv.training)
        return new

    def weight_to_quantize(self) -> torch.Tensor:
        """The float weight the weight quantizer sees."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_on_grid(x)
        weight = self.weight_quantizer(self.weight)
        return self._conv_forward(x, weight, self.quantized_bias(self.bias))
