"""`ImageClassificationData`: the shared LightningDataModule of the app's data sets."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_qat.app.data.epoch_sampler import EpochSampler
from lightning_qat.app.data.tensor_images import TensorImageDataset, balanced_subset


class ImageClassificationData(L.LightningDataModule):
    """Train/val/test loaders over uint8 image tensors that a subclass loads once.

    Args:
        batch_size: images per batch (validation and test use the same).
        num_workers: DataLoader worker processes.
        train_subset: train on a fixed, class-balanced subset of this many images (drawn
            with ``subset_seed``), e.g. the CPU budget protocol's 10k CIFAR images.
        subset_seed: seed of the subset draw.
        val_size: hold out this many training images (class-balanced) for validation;
            0 validates on the test set, as the reference implementation does.
        augment: random crop and flip on training images, where the data set has them.
        seed: the training order and augmentation of epoch ``e`` are drawn from
            ``seed`` and ``e`` alone (`EpochSampler`), so a resumed run sees the very
            batches of the uninterrupted run.
    """

    name = "images"
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    crop_padding = 0
    flip = False

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        train_subset: int | None = None,
        subset_seed: int = 0,
        val_size: int = 0,
        augment: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_subset = train_subset
        self.subset_seed = subset_seed
        self.val_size = val_size
        self.augment = augment
        self.seed = seed
        self.train_set = self.val_set = self.test_set = None
        self.train_indices: torch.Tensor | None = None

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W) and int labels of ``split`` ("train" or "test")."""
        raise NotImplementedError

    def _dataset(self, images, labels, train: bool) -> TensorImageDataset:
        augment = train and self.augment
        return TensorImageDataset(
            images,
            labels,
            self.mean,
            self.std,
            crop_padding=self.crop_padding if augment else 0,
            flip=self.flip and augment,
            seed=self.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load("train")
        test_images, test_labels = self.load("test")
        keep = torch.arange(len(labels))
        if self.val_size:
            val = balanced_subset(labels, self.val_size, self.subset_seed + 1)
            mask = torch.ones(len(labels), dtype=torch.bool)
            mask[val] = False
            keep = mask.nonzero().flatten()
            self.val_set = self._dataset(images[val], labels[val], train=False)
        if self.train_subset:
            keep = keep[balanced_subset(labels[keep], self.train_subset, self.subset_seed)]
        self.train_indices = keep  # into the training split: what the model trains on
        self.train_set = self._dataset(images[keep], labels[keep], train=True)
        self.test_set = self._dataset(test_images, test_labels, train=False)
        if self.val_set is None:
            self.val_set = self.test_set

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(dataset, self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
