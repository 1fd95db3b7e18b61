"""QAT under DDP: 2 CPU processes (gloo). Every rank holds the same scales, zero points
and, with sync_batchnorm, the same folded-BN statistics at every step."""

import lightning as L
import torch
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs

from lightning_qat import FoldedBatchNorm2d, QuantConfig, QuantizationAwareTraining, quantizers


class SameOnEveryRank(L.Callback):
    """Gathers the quantization state of both ranks after every step and compares."""

    def __init__(self):
        self.steps_checked = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        q = [q for _, q in quantizers(module)]
        folded = [m for m in module.modules() if isinstance(m, FoldedBatchNorm2d)]
        assert q and folded and all(m.sync for m in folded)
        state = torch.cat(
            [t.scale.detach().flatten() for t in q]
            + [t.zero_point.flatten().float() for t in q]
            + [m.running_mean for m in folded]
            + [m.running_var for m in folded]
        )
        gathered = trainer.strategy.all_gather(state)
        assert gathered.shape[0] == 2
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree on quantization state"
        self.steps_checked += 1

    def on_train_end(self, trainer, module):
        assert self.steps_checked == trainer.global_step > 0


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    callback = QuantizationAwareTraining(
        QuantConfig(symmetric=False), start_epoch=0, freeze_bn_epoch=1, verbose=False
    )
    trainer = L.Trainer(
        callbacks=[callback, SameOnEveryRank()],
        **trainer_kwargs(
            tmp_path,
            max_epochs=2,
            devices=2,
            strategy="ddp_spawn",
            sync_batchnorm=True,
            deterministic=False,
        ),
    )
    trainer.fit(DigitsClassifier(), DigitsData())
    assert trainer.state.finished and "train_loss" in trainer.callback_metrics
