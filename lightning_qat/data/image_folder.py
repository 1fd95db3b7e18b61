"""A local image data set in ImageFolder layout (``root/{train,test}/<class>/*.jpg``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torchvision
from rich.progress import Progress
from torchvision.io import ImageReadMode, decode_image

from lightning_qat.data.base import ImageClassificationData


class ImageFolderData(ImageClassificationData):
    """Decodes every image once into a uint8 tensor, cached under ``cache_dir``, so later
    runs and epochs never decode JPEGs. Classes are the sorted folder names (ImageFolder's
    order). Defaults fit CIFAR-10; set ``mean``/``std``/``image_size`` for other sets.

    Args:
        root: directory holding ``train/`` and ``test/`` class folders.
        cache_dir: where the decoded tensors are kept (keyed by the absolute root path).
        crop_padding, flip: training augmentation.
    """

    name = "image folder"

    def __init__(
        self,
        root: str,
        cache_dir: str = "data/cache",
        in_channels: int = 3,
        image_size: int = 32,
        mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465),
        std: tuple[float, ...] = (0.2470, 0.2435, 0.2616),
        crop_padding: int = 4,
        flip: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = Path(os.path.expanduser(root))
        self.cache_dir = Path(cache_dir)
        self.in_channels = in_channels
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_padding = crop_padding
        self.flip = flip

    def _cache_path(self, split: str) -> Path:
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        return self.cache_dir / f"imagefolder-{key}-{split}.pt"

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        directory = self.root / split
        if not directory.is_dir():
            raise FileNotFoundError(
                f"{directory} does not exist: data.root must hold train/ and test/ folders "
                "of class sub-folders (torchvision ImageFolder layout)"
            )
        cache = self._cache_path(split)
        if cache.exists():
            saved = torch.load(cache)
            return saved["images"], saved["labels"]
        folder = torchvision.datasets.ImageFolder(directory)
        mode = ImageReadMode.GRAY if self.in_channels == 1 else ImageReadMode.RGB
        images = torch.empty(
            (len(folder.samples), self.in_channels, self.image_size, self.image_size),
            dtype=torch.uint8,
        )
        with Progress(transient=True) as progress:
            task = progress.add_task(f"decoding {directory}", total=len(folder.samples))
            for i, (path, _) in enumerate(folder.samples):
                image = decode_image(torchvision.io.read_file(path), mode=mode)
                if image.shape[-2:] != (self.image_size, self.image_size):
                    raise ValueError(
                        f"{path} is {tuple(image.shape[-2:])}, expected "
                        f"{self.image_size}x{self.image_size} (set data.image_size)"
                    )
                images[i] = image
                progress.advance(task)
        labels = torch.tensor(folder.targets)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"images": images, "labels": labels, "classes": folder.classes}, tmp)
        tmp.replace(cache)  # atomic: a crash never leaves a half-written cache
        return images, labels
