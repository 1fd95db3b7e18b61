"""Network-in-Network for CIFAR-10, as the reference QAT experiment (DESIGN.md section 4)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

#: Channel widths of the reference implementation (666DZY666 model-compression IAO).
NIN_WIDTHS = (192, 160, 96, 192, 192, 192, 192, 192)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, bn_momentum: float) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch, momentum=bn_momentum),
        nn.ReLU(inplace=True),
    ]


class NIN(nn.Sequential):
    """Network in Network (Lin et al. 2014), CIFAR variant of the reference implementation.

    Three mlpconv blocks (5x5, 1x1, 1x1 convolutions, each Conv->BN->ReLU), max-pool 3/2
    after the first two, and global average pooling of 10 maps after the third (the last
    1x1 conv outputs the class scores, followed by BN and ReLU as in the reference).
    Convolutions have no bias, since BN follows each.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = NIN_WIDTHS,
        in_channels: int = 3,
        bn_momentum: float = 0.1,
    ):
        w = list(widths)
        if len(w) != 8:
            raise ValueError(f"NIN needs 8 widths, got {len(w)}: {w}")
        m = bn_momentum
        super().__init__(
            *_conv_bn_relu(in_channels, w[0], 5, m),
            *_conv_bn_relu(w[0], w[1], 1, m),
            *_conv_bn_relu(w[1], w[2], 1, m),
            nn.MaxPool2d(3, stride=2, padding=1),
            *_conv_bn_relu(w[2], w[3], 5, m),
            *_conv_bn_relu(w[3], w[4], 1, m),
            *_conv_bn_relu(w[4], w[5], 1, m),
            nn.MaxPool2d(3, stride=2, padding=1),
            *_conv_bn_relu(w[5], w[6], 3, m),
            *_conv_bn_relu(w[6], w[7], 1, m),
            *_conv_bn_relu(w[7], num_classes, 1, m),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
