"""The introductory QAT example net: two convolutions, two fully connected layers."""

from __future__ import annotations

from torch import nn


class LeNet(nn.Sequential):
    """Conv(3x3)->BN->ReLU->MaxPool twice, then FC->ReLU->FC.

    The small MNIST-style network of the post-training-quantization tutorial in
    ``shared/reference`` (two conv, two fully connected), with BatchNorm so that folding
    is exercised. ``image_size`` is the input height/width (28 for MNIST, 8 for the
    scikit-learn digits) and must be divisible by 4.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        widths: tuple[int, int, int] = (32, 64, 128),
    ):
        if image_size % 4:
            raise ValueError(f"LeNet image_size={image_size} must be divisible by 4")
        c1, c2, hidden = widths
        side = image_size // 4
        super().__init__(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
