"""QAT on a CUDA device: what a user training on a GPU gets (skipped without one; CI has
none, the checks ran on a lent H200: README, "On a GPU")."""

import copy
import dataclasses

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import DigitsClassifier, DigitsData, script_module, trainer_kwargs
from test_learned_scale import LSQ_W4A4
from torch import nn

from lightning_qat import QuantConfig, QuantizationAwareTraining, prepare_qat, quantizers
from lightning_qat.app.models import ResNetCifar
from lightning_qat.export import OnnxRuntimeModel, evaluate_deployment, to_integer, to_onnx

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = {
    "w8a8": QuantConfig(),
    "w8a8-asym-unfolded": QuantConfig(symmetric=False, bn_fold=False),
    "lsq-w4a4": LSQ_W4A4,
    "lsq-w4a4-weight-units": dataclasses.replace(LSQ_W4A4, folded_step_units="weight"),
}


class DevicesAtEpochEnd(L.Callback):
    """The devices of every tensor of the module's state at each epoch's end (Lightning
    moves the module back to the CPU when fit ends)."""

    def __init__(self):
        self.devices = []

    def on_train_epoch_end(self, trainer, module):
        state = module.state_dict().values()
        self.devices.append({t.device.type for t in state if isinstance(t, torch.Tensor)})


def _fit(tmp_path, config, name, max_epochs=4, ckpt_path=None, export=False, **overrides):
    L.seed_everything(0, verbose=False)
    module = DigitsClassifier(arch="resnet8")
    callback = QuantizationAwareTraining(
        config,
        start_epoch=1,
        freeze_bn_epoch=2,
        freeze_observer_epoch=3,
        calibration_batches=2,
        verbose=False,
        export_on_fit_end=tmp_path / name / "model.int8.onnx" if export else None,
        export_integer=export,
    )
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / name, filename="{epoch}", save_top_k=-1, every_n_epochs=1
    )
    kwargs = trainer_kwargs(
        tmp_path, max_epochs=max_epochs, accelerator="cuda", enable_checkpointing=True
    )
    kwargs.update(overrides)
    trainer = L.Trainer(callbacks=[callback, checkpoints, DevicesAtEpochEnd()], **kwargs)
    trainer.fit(module, DigitsData(), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("name", list(CONFIGS))
def test_qat_on_cuda_trains_resumes_and_deploys(name, tmp_path):
    """Converted at epoch 1 on the GPU (new quantizers on the model's device), BN then
    observers frozen, deterministic algorithms on; resumed from epoch 1 it ends as the
    uninterrupted run; the model exports from the GPU and deploys with its top-1."""
    config = CONFIGS[name]
    full, trainer = _fit(tmp_path, config, "full", export=True)
    assert trainer.callback_metrics["val_acc"] > 0.5
    (devices,) = [c for c in trainer.callbacks if isinstance(c, DevicesAtEpochEnd)]
    assert devices.devices == [{"cuda"}] * 4  # the quantizers made at epoch 1 too
    resumed, _ = _fit(tmp_path, config, "resumed", ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    expected, got = full.state_dict(), resumed.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, msg=key)
    model = full.net.cuda().eval()
    data = DigitsData()
    x = torch.cat([b[0] for b in data.test_dataloader()]).cuda()
    path = to_onnx(model, tmp_path / "model.onnx", x[:1])
    with torch.no_grad():
        fake = model(x).argmax(1).cpu()
    for prefix, deployed in (("onnx", OnnxRuntimeModel(path)), ("int", to_integer(model))):
        # (the integer model quantizes the input, which these configs train in float)
        result = evaluate_deployment(deployed, model, data.test_dataloader(), prefix)
        assert result[f"{prefix}_agreement"] >= 0.9, result
    # exported at fit end from the GPU: the integer reference is a CPU model, loadable
    # where no GPU is (exact integer sums need the CPU's float convolutions)
    saved = torch.load(tmp_path / "full" / "model.integer.pt", weights_only=False)
    assert {t.device.type for t in saved.state_dict().values()} == {"cpu"}
    assert (saved(x).argmax(1).cpu() == fake).float().mean() >= 0.9


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_computes_what_the_cpu_computes(name):
    """One training step of the same prepared ResNet-8 (its quantizers started on the
    CPU: an MSE search's argmin is not something two devices must agree on), TF32 off,
    compared module by module (`scripts/device_agreement.py`): each module of the GPU
    copy, fed the inputs its CPU twin got, computes the CPU's output up to a code
    flipped here and there by float reordering (beyond 1e-5 of the output's magnitude
    on a few percent of its elements at most); a wrong kernel would move nearly all.

    End to end the two devices part, and no tolerance separates that from a defect: on
    an H200 one flipped activation code in the first block changed 80% of a 4-bit
    ResNet-8's later outputs (the first form of this test compared the final outputs
    and failed for three of four configurations for that reason alone)."""
    torch.manual_seed(0)
    model = prepare_qat(ResNetCifar(depth=8, in_channels=1), CONFIGS[name]).train()
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    model(x)  # observes, and starts the learned steps
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        result = script_module("scripts", "device_agreement").compare(model, x, y, "cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert result["grads"], "no gradients compared"
    for difference in result["fed"]:
        assert difference.fraction <= 0.05, difference


def test_bf16_mixed_on_cuda_keeps_quantizer_state_in_float32(tmp_path):
    module, trainer = _fit(tmp_path, LSQ_W4A4, "bf16", max_epochs=3, precision="bf16-mixed")
    assert trainer.callback_metrics["val_acc"] > 0.5
    for name, quantizer in quantizers(module):
        assert quantizer.scale.dtype == torch.float32, name
        assert torch.isfinite(quantizer.scale).all(), name


def test_compiled_folded_qat_on_cuda_steps_as_eager():
    """Inductor on the GPU (triton kernels): a folded LSQ and an observer-based model's
    training steps compute what eager computes (the fold factor read before the BN
    updates it: the bug of ccd5461 on the CPU)."""
    for config in (QuantConfig(), LSQ_W4A4):
        torch.manual_seed(0)
        model = prepare_qat(ResNetCifar(depth=8, in_channels=1), config).cuda().train()
        x = torch.randn(32, 1, 8, 8, device="cuda")
        y = torch.randint(0, 10, (32,), device="cuda")
        model(x)  # learning starts (eager)
        grads = []
        for compiled in (False, True):
            copy_ = copy.deepcopy(model)
            step = torch.compile(copy_) if compiled else copy_
            for _ in range(2):
                copy_.zero_grad()
                nn.functional.cross_entropy(step(x), y).backward()
            grads.append({n: p.grad for n, p in copy_.named_parameters() if p.grad is not None})
        eager, compiled = grads
        assert eager.keys() == compiled.keys()
        largest = max(float(g.norm()) for g in eager.values())
        for key, grad in eager.items():
            # (a wrong fold factor is off by f_new / f_old, percents, per channel; a zero
            # point's gradient is a sum with cancellation, its rounding absolute)
            difference = float((compiled[key] - grad).norm())
            assert difference < 1e-3 * float(grad.norm()) + 1e-6 * largest, (key, difference)


@pytest.mark.parametrize("name", ["w8a8", "lsq-w4a4"])
def test_a_training_step_on_cuda_reads_nothing_back_to_the_host(name):
    """After the first step (calibration and LSQ's start read values on the host once),
    a QAT training step launches its kernels without waiting for the GPU: no observer,
    fake-quant kernel or fold reads a value back (`bench/qat_overhead.py --ops` counts
    the reads the CPU makes; symmetric weight grids hand the per-channel kernel a float
    zero point, which torch does not range-check on the host)."""
    torch.manual_seed(0)
    model = prepare_qat(ResNetCifar(depth=8, in_channels=1), CONFIGS[name]).cuda().train()
    x = torch.randn(32, 1, 8, 8, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    nn.functional.cross_entropy(model(x), y).backward()  # observes, starts learning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
