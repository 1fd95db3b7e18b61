"""Moved to `lightning_qat.app.module` (the app layer); this alias keeps old imports and
Hydra ``_target_``s working."""

from lightning_qat.app.module import *  # noqa: F403
