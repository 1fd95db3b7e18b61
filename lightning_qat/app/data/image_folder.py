"""A local image data set in ImageFolder layout (``root/{train,test}/<class>/*.jpg``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torchvision
from rich.progress import Progress
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.io import ImageReadMode, decode_image

from lightning_qat.app.data.base import ImageClassificationData


class ImageFolderData(ImageClassificationData):
    """Decodes every image once into a uint8 tensor, cached under ``cache_dir``, so later
    runs and epochs never decode JPEGs. Classes are the sorted folder names (ImageFolder's
    order). Defaults fit CIFAR-10; set ``mean``/``std``/``image_size`` for other sets.

    Args:
        root: directory holding ``train/`` and ``test/`` class folders.
        cache_dir: where the decoded tensors are kept (keyed by the file list: names,
            sizes and modification times).
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

    def classes(self) -> list[str]:
        """The class names, one list for both splits: the sorted folder names of
        ``train/`` (ImageFolder's order). A ``test/`` with other classes is refused: each
        split numbering its own folders would shift every later label silently."""
        lists = {}
        for split in ("train", "test"):
            directory = self.root / split
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"{directory} does not exist: data.root must hold train/ and test/ "
                    "folders of class sub-folders (torchvision ImageFolder layout)"
                )
            lists[split] = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        train, test = lists["train"], lists["test"]
        if train != test:
            only_train = sorted(set(train) - set(test))
            only_test = sorted(set(test) - set(train))
            raise ValueError(
                f"{self.root}: train/ and test/ hold different classes (only in train/: "
                f"{only_train or 'none'}; only in test/: {only_test or 'none'}); both "
                "splits must have the same class folders, or their labels would not match"
            )
        return train

    def _samples(self, split: str, classes: list[str]) -> list[tuple[str, int]]:
        return make_dataset(
            str(self.root / split), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS
        )

    def _cache_path(self, split: str, classes: list[str], samples: list[tuple[str, int]]) -> Path:
        """Keyed on what the decoded tensor depends on: the file list (names, sizes and
        modification times), the classes and the decoding settings. An edit to the
        folder (a file added, deleted or rewritten, a class removed) is a new key."""
        digest = hashlib.sha1()
        digest.update(repr((classes, self.in_channels, self.image_size)).encode())
        for path, label in samples:
            stat = os.stat(path)
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        root = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        return self.cache_dir / f"imagefolder-{root}-{split}-{digest.hexdigest()[:16]}.pt"

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        classes = self.classes()
        samples = self._samples(split, classes)
        cache = self._cache_path(split, classes, samples)
        if cache.exists():
            saved = torch.load(cache)
            return saved["images"], saved["labels"]
        mode = ImageReadMode.GRAY if self.in_channels == 1 else ImageReadMode.RGB
        images = torch.empty(
            (len(samples), self.in_channels, self.image_size, self.image_size),
            dtype=torch.uint8,
        )
        directory = self.root / split
        with Progress(transient=True) as progress:
            task = progress.add_task(f"decoding {directory}", total=len(samples))
            for i, (path, _) in enumerate(samples):
                try:
                    image = decode_image(torchvision.io.read_file(path), mode=mode)
                except RuntimeError as error:  # torchvision names no file
                    raise ValueError(f"{path}: cannot decode the image ({error})") from error
                if image.shape[-2:] != (self.image_size, self.image_size):
                    raise ValueError(
                        f"{path} is {tuple(image.shape[-2:])}, expected "
                        f"{self.image_size}x{self.image_size} (set data.image_size)"
                    )
                images[i] = image
                progress.advance(task)
        labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        cache.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file of this process's own, renamed: a crash never leaves a
        # half-written cache, and two first runs never write into one file
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        torch.save({"images": images, "labels": labels, "classes": classes}, tmp)
        tmp.replace(cache)
        for stale in cache.parent.glob(cache.name.rsplit("-", 1)[0] + "-*.pt"):
            if stale != cache:  # the caches of the folder before its edit
                stale.unlink(missing_ok=True)
        return images, labels
