"""Moved to `lightning_qat.app.data` (the app layer); this alias keeps old imports and
Hydra ``_target_``s working."""

from lightning_qat.app.data import *  # noqa: F403
