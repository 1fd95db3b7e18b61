"""A small LightningModule and DataModule on real data (scikit-learn digits), for the
callback tests. Module-level so that DDP's spawned processes can unpickle them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qat.app.models import LeNet, ResNetCifar

ROOT = Path(__file__).resolve().parents[1]


class DigitsData(L.LightningDataModule):
    """Fixed slices of the digits, never shuffled: runs are deterministic and resumable."""

    def __init__(self, n_train: int = 512, n_val: int = 96, batch_size: int = 32):
        super().__init__()
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[-n_val:], y[-n_val:])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class DigitsClassifier(L.LightningModule):
    """An ordinary LightningModule: nothing in it knows about quantization."""

    def __init__(
        self, lr: float = 0.05, widths: tuple[int, int, int] = (8, 16, 32), arch: str = "lenet"
    ):
        super().__init__()
        self.save_hyperparameters()
        if arch == "resnet8":  # residual adds, projection shortcuts
            self.net = ResNetCifar(depth=8, in_channels=1)
        else:
            self.net = LeNet(image_size=8, widths=widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss)
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean())
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(1)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return [optimizer], [scheduler]


def trainer_kwargs(tmp_path, **overrides):
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def script_module(folder: str, name: str):
    """The module of the script ``folder/name.py`` (bench/ and scripts/ are not packages)."""
    sys.path.insert(0, str(ROOT / folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
