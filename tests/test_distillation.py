"""Knowledge distillation in the app's ImageClassifier: the loss is Hinton et al.'s, the
teacher stays float, frozen and out of the checkpoints while the model is converted."""

import copy
import math
from functools import partial

import lightning as L
import pytest
import torch
from lightning_helpers import DigitsData
from torch import nn

from lightning_qat import QuantizationAwareTraining
from lightning_qat.app.models import LeNet
from lightning_qat.app.module import ImageClassifier
from lightning_qat.quant import FakeQuantize


def classifier(weight: float, temperature: float = 2.0) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        LeNet(in_channels=1, num_classes=10, image_size=8),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        distillation_weight=weight,
        distillation_temperature=temperature,
    )


def test_the_training_loss_is_hintons_mix_of_labels_and_teacher():
    module = classifier(0.7, temperature=3.0)
    teacher = copy.deepcopy(module.model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    module.set_teacher(teacher)
    module.log = lambda *args, **kwargs: None
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss = module.training_step((x, y), 0)
    student, taught = module.model(x), teacher(x)
    p_t = torch.softmax(taught / 3.0, dim=1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / 3.0, dim=1))).sum(1).mean()
    want = 0.3 * nn.functional.cross_entropy(student, y) + 0.7 * 9.0 * kl
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in module.model.parameters())


def test_a_teacher_equal_to_the_model_adds_nothing():
    module = classifier(1.0)
    module.set_teacher(copy.deepcopy(module.model))
    module.log = lambda *args, **kwargs: None
    module.eval()  # BN on running statistics, as the teacher's
    loss = module.training_step((torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), 0)
    assert abs(loss.item()) < 1e-6


def test_the_teacher_stays_float_and_out_of_the_checkpoint_through_qat(tmp_path):
    module = classifier(0.5)
    module.set_teacher(copy.deepcopy(module.model))
    teacher_state = copy.deepcopy(module.teacher.state_dict())
    qat = QuantizationAwareTraining({"weight_bits": 4, "activation_bits": 4}, start_epoch=0)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[qat],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsData(n_train=128))
    assert any(isinstance(m, FakeQuantize) for m in module.model.modules())
    assert not any(isinstance(m, FakeQuantize) for m in module.teacher.modules())
    assert not module.teacher.training
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key  # frozen: BN statistics too
    assert not any(key.startswith("_teacher") for key in module.state_dict())
    assert math.isfinite(trainer.callback_metrics["train_distillation_loss"].item())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distillation_weight": 1.5}, r"distillation_weight=1.5 must be in \[0, 1\]"),
        ({"distillation_weight": -0.1}, r"distillation_weight=-0.1"),
        ({"distillation_temperature": 0.0}, r"distillation_temperature=0.0 must be a finite"),
        ({"distillation_temperature": float("inf")}, r"distillation_temperature=inf must be"),
        ({"distillation_temperature": float("nan")}, r"distillation_temperature=nan must be"),
    ],
)
def test_bad_distillation_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageClassifier(nn.Linear(2, 2), optimizer=torch.optim.SGD, **kwargs)


def test_a_teacher_without_a_distillation_weight_is_refused():
    module = classifier(0.0)
    with pytest.raises(ValueError, match="distillation_weight is 0"):
        module.set_teacher(copy.deepcopy(module.model))
