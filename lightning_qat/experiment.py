"""Moved to `lightning_qat.app.experiment` (the app layer); this alias keeps old imports and
Hydra ``_target_``s working."""

from lightning_qat.app.experiment import *  # noqa: F403
