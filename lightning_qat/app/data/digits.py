"""scikit-learn's bundled 8x8 digits (UCI optdigits test set): no download."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lightning_qat.app.data.base import ImageClassificationData


class DigitsData(ImageClassificationData):
    """1,797 grey 8x8 digits, a fixed stratified split (``test_fraction`` for test)."""

    name = "digits"
    in_channels = 1
    image_size = 8
    mean = (0.305,)
    std = (0.376,)

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        digits = load_digits()
        images = torch.tensor(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
        labels = torch.tensor(digits.target)
        train, test = train_test_split(
            torch.arange(len(labels)),
            test_size=self.test_fraction,
            stratify=labels,
            random_state=self.split_seed,
        )
        index = train if split == "train" else test
        return images[index], labels[index]
