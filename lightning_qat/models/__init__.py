"""Model zoo of the app: the networks the recipes train."""

from lightning_qat.models.lenet import LeNet
from lightning_qat.models.nin import NIN, NIN_WIDTHS

__all__ = ["NIN", "NIN_WIDTHS", "LeNet"]
