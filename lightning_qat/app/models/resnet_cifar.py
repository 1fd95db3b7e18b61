"""ResNet-20 for CIFAR (He et al. 2016, section 4.2)."""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 Conv->BN, identity shortcut or a 1x1 Conv->BN projection when the shape
    changes (option B of the paper)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                nn.BatchNorm2d(out_ch, momentum=bn_momentum),
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16-32-64 channels, n blocks per stage.
    ``bn_momentum`` is every BatchNorm's, as for `NIN` (whose reference recipe uses 0.01)."""

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, bn_momentum: float = 0.1
    ):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNetCifar depth={depth} must be 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        layers, in_ch = [], 16
        for out_ch, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_ch, out_ch, stride if i == 0 else 1, bn_momentum))
                in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet20(num_classes: int = 10, in_channels: int = 3, bn_momentum: float = 0.1) -> ResNetCifar:
    return ResNetCifar(20, num_classes, in_channels, bn_momentum)
