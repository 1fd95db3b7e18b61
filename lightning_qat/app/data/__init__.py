"""The app's LightningDataModules."""

from lightning_qat.app.data.base import ImageClassificationData
from lightning_qat.app.data.digits import DigitsData
from lightning_qat.app.data.epoch_sampler import EpochSampler
from lightning_qat.app.data.image_folder import ImageFolderData
from lightning_qat.app.data.tensor_images import TensorImageDataset, balanced_subset
from lightning_qat.app.data.torchvision_sets import CIFAR10Data, MNISTData

__all__ = [
    "CIFAR10Data",
    "DigitsData",
    "EpochSampler",
    "ImageClassificationData",
    "ImageFolderData",
    "MNISTData",
    "TensorImageDataset",
    "balanced_subset",
]
