"""Each reason Lightning 1.x's QuantizationAwareTraining callback was removed, shown not
to happen here. (Also covered elsewhere: BN freezing and the start epoch in
test_callback.py, DDP in test_ddp.py, autocast in test_callback.py, resume in
test_resume.py.)"""

import inspect

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs

from lightning_qat import QuantConfig, QuantizationAwareTraining, load_qat_checkpoint


class WithKeywordForward(DigitsClassifier):
    def forward(self, x: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        return self.net(x) / temperature


def fitted(tmp_path, module):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="max")
    trainer = L.Trainer(
        callbacks=[
            QuantizationAwareTraining(QuantConfig(), start_epoch=1, verbose=False),
            checkpoint,
        ],
        **trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True),
    )
    trainer.fit(module, DigitsData())
    return trainer, checkpoint.best_model_path


def inputs():
    return torch.stack([DigitsData().val_set[i][0] for i in range(8)])


def test_forward_is_not_wrapped_and_keeps_keyword_arguments(tmp_path):
    module = WithKeywordForward()
    signature = inspect.signature(module.forward)
    fitted(tmp_path, module)
    assert "forward" not in vars(module) and type(module).forward is WithKeywordForward.forward
    assert inspect.signature(module.forward) == signature
    module.eval()
    x = inputs()
    torch.testing.assert_close(module(x, temperature=2.0), module(x) / 2)


def test_torchscript_trace_of_the_quantized_model_matches_it(tmp_path):
    module = DigitsClassifier()
    fitted(tmp_path, module)
    module.eval()
    x = inputs()
    with torch.no_grad():
        traced = torch.jit.trace(module, x)
        torch.jit.save(traced, tmp_path / "model.pt")
        reloaded = torch.jit.load(tmp_path / "model.pt")
        assert torch.equal(reloaded(x), module(x))


def test_trainer_test_with_ckpt_path_after_fit(tmp_path):
    module = DigitsClassifier()
    trainer, best = fitted(tmp_path, module)
    from_best = trainer.test(module, DigitsData(), ckpt_path="best", verbose=False)[0]
    from_path = trainer.test(module, DigitsData(), ckpt_path=best, verbose=False)[0]
    assert from_best == from_path and from_best["test_acc"] > 0.5


def test_load_from_checkpoint_with_fake_quant_keys(tmp_path):
    module = DigitsClassifier()
    _, best = fitted(tmp_path, module)
    loaded = load_qat_checkpoint(DigitsClassifier, best)
    assert loaded.hparams.lr == module.hparams.lr
    checkpoint = torch.load(best, weights_only=False)
    assert any("weight_quantizer.scale" in k for k in checkpoint["state_dict"])
    restored_state = loaded.state_dict()
    for key, value in checkpoint["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored_state[key], value), key


def test_qat_can_start_from_a_float_checkpoint(tmp_path):
    """FP32 pre-training saved without QAT, fine-tuned with QAT from epoch 0."""
    float_trainer = L.Trainer(
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "fp32")],
        **trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True),
    )
    float_trainer.fit(DigitsClassifier(), DigitsData())
    ckpt = float_trainer.checkpoint_callback.best_model_path
    module = DigitsClassifier()
    trainer = L.Trainer(
        callbacks=[QuantizationAwareTraining(QuantConfig(), start_epoch=0, verbose=False)],
        **trainer_kwargs(tmp_path, max_epochs=4),
    )
    trainer.fit(module, DigitsData(), ckpt_path=ckpt)
    assert trainer.callback_metrics["val_acc"] > 0.5
    float_state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert not torch.equal(module.net[0].weight, float_state["net.0.weight"])  # it trained on
