"""The callback from Lightning's own CLI (``LightningCLI``), no Hydra: a LeNet on
scikit-learn's bundled digits.

    python examples/lightning_cli.py fit --trainer.max_epochs=4 \\
        --trainer.callbacks+=lightning_qat.QuantizationAwareTraining \\
        --trainer.callbacks.init_args.config.weight_bits=4 \\
        --trainer.callbacks.init_args.start_epoch=1
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py test --config examples/lightning_cli.yaml \\
        --ckpt_path <checkpoint>
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_qat.app.data import DigitsData
from lightning_qat.app.models import LeNet


class DigitsLeNet(L.LightningModule):
    """A plain LightningModule: nothing in it knows about quantization."""

    def __init__(self, lr: float = 0.05, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.save_hyperparameters()
        self.net = LeNet(image_size=8, widths=widths)
        self.example_input_array = torch.zeros(1, 1, 8, 8)  # for export_on_fit_end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(DigitsLeNet, DigitsData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
