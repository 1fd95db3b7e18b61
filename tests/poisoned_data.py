"""The app's digits with one NaN pixel in one training image (uint8 images cannot hold
NaN; a float pipeline, e.g. a bad normalisation, can). Importable by the app's process
with ``PYTHONPATH=tests``: ``data._target_=poisoned_data.PoisonedDigitsData``."""

from __future__ import annotations

import math

from lightning_qat.app.data import DigitsData


class _Poisoned:
    def __init__(self, dataset, index: int):
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        x, y = self.dataset[key]
        if (key[0] if isinstance(key, tuple) else key) == self.index:
            x = x.clone()
            x[0, 4, 4] = math.nan
        return x, y


class PoisonedDigitsData(DigitsData):
    def __init__(self, poisoned_index: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.poisoned_index = poisoned_index

    def setup(self, stage: str | None = None) -> None:
        fresh = self.train_set is None
        super().setup(stage)
        if fresh:
            self.train_set = _Poisoned(self.train_set, self.poisoned_index)
