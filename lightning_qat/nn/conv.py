"""Quantized convolutions: `QuantConv2d`, `QuantConv1d` and `QuantConvTranspose2d`, with
fake-quantized input and weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_qat.nn.layer import QuantizedLayerMixin
from lightning_qat.nn.pruning import adopt_tensor
from lightning_qat.quant import QuantConfig


def conv_kwargs(conv: nn.modules.conv._ConvNd) -> dict:
    """Constructor arguments that rebuild ``conv``'s geometry (any groups, padding mode;
    a transposed convolution's output padding)."""
    kwargs = dict(
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
    if conv.transposed:
        kwargs["output_padding"] = conv.output_padding
    return kwargs


#: The former name, kept working.
conv2d_kwargs = conv_kwargs


class QuantConvMixin(QuantizedLayerMixin):
    """``y = conv(Q_a(x), Q_w(W)) + Q_b(b)``: input and weight fake-quantized, the bias on
    the accumulator's int32 grid (scale ``s_x s_w``; Jacob et al. 2018, section 2.4).

    Weights are quantized per output channel (axis 0 of `weight_to_quantize`) when the
    config says so, which also covers grouped and depthwise convolutions (one scale per
    filter).

    Args: as the torch convolution, plus
        config: the quantization scheme.
        quantize_input: fake-quantize the input; when ``False`` its range is still observed.
    """

    def __init__(
        self, *args, config: QuantConfig | None = None, quantize_input: bool = True, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self._init_quantizers(config, quantize_input, self.out_channels)

    @classmethod
    def from_float(
        cls, conv: nn.modules.conv._ConvNd, config: QuantConfig, quantize_input: bool = True
    ) -> QuantConvMixin:
        """A quantized convolution holding the very same Parameter objects as ``conv``."""
        new = cls(**conv_kwargs(conv), config=config, quantize_input=quantize_input)
        adopt_tensor(new, conv, "weight")  # pruned weights stay pruned
        adopt_tensor(new, conv, "bias")
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_on_grid(x)
        weight = self.weight_quantizer(self.weight)
        return self._conv_forward(x, weight, self.quantized_bias(self.bias))


class QuantConv2d(QuantConvMixin, nn.Conv2d):
    __doc__ = QuantConvMixin.__doc__


class QuantConv1d(QuantConvMixin, nn.Conv1d):
    __doc__ = QuantConvMixin.__doc__


class QuantConvTranspose2d(QuantConvMixin, nn.ConvTranspose2d):
    """``y = conv_transpose(Q_a(x), Q_w(W)) + Q_b(b)``, as `QuantConv2d`.

    torch stores a transposed convolution's weight input channels first,
    ``[C_in, C_out / groups, kH, kW]``; its output channels are ``(group, j)`` pairs. The
    weight quantizer sees it output channels first (`weight_to_quantize`,
    ``[C_out, C_in / groups, kH, kW]``), so that per-channel scales are per output
    channel, as the int32 bias ``s_x s_w`` and the requantization need.
    """

    def weight_to_quantize(self) -> torch.Tensor:
        return _swap_channels(self.weight, self.groups)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        x = self.input_on_grid(x)
        weight = self.weight_quantizer(self.weight_to_quantize())
        weight = _swap_channels(weight, self.groups)  # back to torch's layout
        bias = self.quantized_bias(self.bias)
        return F.conv_transpose2d(
            x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


def _swap_channels(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed convolution's weight ``[C_in, C_out/g, k...]`` as ``[C_out, C_in/g,
    k...]`` (output channel ``(group, j)`` at row ``group * C_out/g + j``); its own
    inverse (within each group it is a transpose)."""
    first, second, *kernel = weight.shape
    grouped = weight.reshape(groups, first // groups, second, *kernel).transpose(1, 2)
    return grouped.reshape(groups * second, first // groups, *kernel)
