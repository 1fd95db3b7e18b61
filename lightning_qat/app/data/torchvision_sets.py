"""MNIST and CIFAR-10 through torchvision, downloaded to a configurable directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision

from lightning_qat.app.data.base import ImageClassificationData


class _TorchvisionData(ImageClassificationData):
    dataset_class: type = torchvision.datasets.VisionDataset
    hint = ""

    def __init__(self, data_dir: str = "data", download: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.data_dir = data_dir
        self.download = download

    def prepare_data(self) -> None:
        for train in (True, False):
            self._open(train)

    def _open(self, train: bool):
        try:
            return self.dataset_class(self.data_dir, train=train, download=self.download)
        except (RuntimeError, OSError) as err:  # offline: URLError is an OSError
            raise RuntimeError(
                f"{self.name} is not in {Path(self.data_dir).resolve()} and could not be "
                f"downloaded ({type(err).__name__}: {err}). Point data.data_dir at a "
                f"directory holding torchvision's copy{self.hint}."
            ) from err

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = self._open(split == "train")
        images = torch.as_tensor(np.asarray(dataset.data))
        images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
        return images.contiguous(), torch.as_tensor(np.asarray(dataset.targets))


class MNISTData(_TorchvisionData):
    """MNIST (LeCun et al. 1998): 60k/10k grey 28x28 digits, no augmentation."""

    name = "MNIST"
    dataset_class = torchvision.datasets.MNIST
    in_channels = 1
    image_size = 28
    mean = (0.1307,)
    std = (0.3081,)


class CIFAR10Data(_TorchvisionData):
    """CIFAR-10 (Krizhevsky 2009): 50k/10k colour 32x32 images, random crop (padding 4)
    and horizontal flip for training, as the reference implementation."""

    name = "CIFAR-10"
    dataset_class = torchvision.datasets.CIFAR10
    hint = (
        ", or use data=cifar10_folder with data.root=<dir with train/ and test/ in "
        "ImageFolder layout>"
    )
    in_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    crop_padding = 4
    flip = True
