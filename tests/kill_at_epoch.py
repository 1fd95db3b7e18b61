"""A callback that SIGKILLs its own process at the start of an epoch: a real crash at a
known point, for the app's resume test (``PYTHONPATH=tests``)."""

import os
import signal

import lightning as L


class KillAtEpoch(L.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
