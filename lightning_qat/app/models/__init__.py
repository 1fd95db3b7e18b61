"""Model zoo of the app: the networks the recipes train."""

from lightning_qat.app.models.lenet import LeNet
from lightning_qat.app.models.mobilenet import mobilenet_v2_cifar
from lightning_qat.app.models.nin import NIN, NIN_WIDTHS
from lightning_qat.app.models.resnet_cifar import ResNetCifar, resnet20
from lightning_qat.app.models.vit import VisionTransformer, vit_tiny

__all__ = [
    "NIN",
    "NIN_WIDTHS",
    "LeNet",
    "ResNetCifar",
    "VisionTransformer",
    "mobilenet_v2_cifar",
    "resnet20",
    "vit_tiny",
]
