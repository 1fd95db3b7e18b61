"""Moved to `lightning_qat.app.report` (the app layer); this alias keeps old imports and
Hydra ``_target_``s working."""

from lightning_qat.app.report import *  # noqa: F403
from lightning_qat.app.report import main

if __name__ == "__main__":  # `python -m lightning_qat.report <sweep>`, as documented
    main()
