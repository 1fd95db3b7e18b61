"""Moved to `lightning_qat.app.models` (the app layer); this alias keeps old imports and
Hydra ``_target_``s working."""

from lightning_qat.app.models import *  # noqa: F403
