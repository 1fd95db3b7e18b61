"""Moved to `lightning_qat.app.run_folder` (the app layer); this alias keeps old imports and
Hydra ``_target_``s working."""

from lightning_qat.app.run_folder import *  # noqa: F403
