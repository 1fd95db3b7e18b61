"""torchvision's MobileNetV2 sized for 32x32 inputs."""

from __future__ import annotations

import torchvision
from torch import nn


def mobilenet_v2_cifar(
    num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3
) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018) with the stem and the first downsampling
    inverted residual at stride 1, as is usual for CIFAR: 32x32 inputs end at a 4x4 map
    instead of 1x1. ``in_channels`` other than 3 replaces the stem convolution."""
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
    stem = model.features[0][0]
    if in_channels != stem.in_channels:
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)
    model.features[0][0].stride = (1, 1)  # stem conv
    # the first stride-2 inverted residual (features[2]): its depthwise conv
    model.features[2].conv[1][0].stride = (1, 1)
    return model
