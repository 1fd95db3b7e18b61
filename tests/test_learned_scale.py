"""Learned step sizes (LSQ, LSQ+), per-layer bit widths and the MSE range search."""

import copy
import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs
from qat_digits import train_qat_digits
from test_export_graphs import FLOAT_KERNELS, optimized_ops
from torch import nn

from lightning_qat import (
    FakeQuantize,
    LearnedScaleFakeQuantize,
    QuantConfig,
    QuantizationAwareTraining,
    calibrate,
    prepare_qat,
    quantized_layers,
    quantizer_parameters,
    quantizers,
)
from lightning_qat.app.models import ResNetCifar
from lightning_qat.callback import QUANTIZER_GROUP
from lightning_qat.export import OnnxRuntimeModel, evaluate_deployment, to_integer, to_onnx
from lightning_qat.quant import learned_fake_quantize, zeroed_channels
from lightning_qat.quant.range_search import lsq_initial_scale, mse_range

LSQ_W4A4 = QuantConfig(
    weight_bits=4,
    activation_bits=4,
    learn_scale=True,
    activation_symmetric=False,
    layer_bits={"@first": 8, "@last": 8},
)


def learning_quantizer(bits, symmetric, weights=False, channels=None, high_bits_damping=True):
    config = QuantConfig(
        weight_bits=bits,
        activation_bits=bits,
        symmetric=symmetric,
        learn_scale=True,
        high_bits_damping=high_bits_damping,
    )
    if weights:
        return FakeQuantize.for_weights(config, channels or 1).train()
    return FakeQuantize.for_activations(config).train()


@pytest.mark.parametrize(
    ("bits", "damped"), [(4, True), (8, True), (8, False)], ids=["4", "8", "8-undamped"]
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_step_size_gradient_is_lsq_formula(symmetric, bits, damped):
    """d x_hat / d s = round(x/s) - x/s inside the range, qmin - z / qmax - z where
    clipped, times g = 1/sqrt(N Qp) (Esser et al. 2019, eqs. 3 and 4); the zero point
    gets -s g where clipped (LSQ+). Above 4 bits g is damped by 2^(-1.5 (b - 4)): 1/64
    at 8 bits, unless ``high_bits_damping=False`` (or ``"weights"``, as this is an
    activation step: `test_the_damping_scales_every_step_or_the_weight_steps_only`)."""
    torch.manual_seed(0)
    quantizer = learning_quantizer(bits, symmetric, high_bits_damping=damped)
    x = torch.randn(8, 50) * 2
    quantizer(x)  # starts learning: the step from the first batch
    assert quantizer.learning
    s = quantizer.scale.detach().clone()
    z = float(quantizer.zero_point)
    quantizer.scale.grad = None
    upstream = torch.randn(8, 50)
    (quantizer(x) * upstream).sum().backward()
    qmin, qmax = quantizer.quant_min, quantizer.quant_max
    v = x / s
    codes = torch.round(v) + z
    d_scale = torch.where(
        codes < qmin,
        qmin - z,
        torch.where(codes > qmax, qmax - z, torch.round(v) - v),
    )
    levels = qmax if symmetric else qmax - qmin
    g = 1 / (50 * levels) ** 0.5  # 50 features a sample
    if bits == 8 and damped:
        g /= 64
    expected = (upstream * d_scale).sum() * g
    assert quantizer.scale.grad is not None
    torch.testing.assert_close(quantizer.scale.grad.reshape(()), expected, rtol=1e-4, atol=1e-6)
    if not symmetric:
        clipped = (codes < qmin) | (codes > qmax)
        expected_z = (upstream * clipped * -s).sum() * g
        got = quantizer.learned_zero_point.grad.reshape(())
        torch.testing.assert_close(got, expected_z, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_damping_scales_every_step_or_the_weight_steps_only(bits):
    """``high_bits_damping``: the step's gradient times 2^(-1.5 (b - 4)) (1/64 at 8 bits,
    1 at 4); ``True`` for weight and activation steps, ``"weights"`` for weight steps
    (activation steps as published)."""
    torch.manual_seed(0)
    x = torch.randn(4, 50) * 2
    upstream = torch.randn(4, 50)
    grads = {}
    for weights in (True, False):
        for damping in (True, "weights", False):
            quantizer = learning_quantizer(bits, True, weights, 4, high_bits_damping=damping)
            quantizer(x)  # starts learning
            (quantizer(x) * upstream).sum().backward()
            grads[weights, damping] = quantizer.scale.grad
    factor = 1 / 64 if bits == 8 else 1.0
    for weights in (True, False):
        assert grads[weights, False].abs().min() > 0
        torch.testing.assert_close(grads[weights, True], grads[weights, False] * factor)
    torch.testing.assert_close(grads[True, "weights"], grads[True, False] * factor)
    assert torch.equal(grads[False, "weights"], grads[False, False])


def _worst_step_drift(seed: int, steps: int = 100) -> float:
    """Fits 16 channels of 8-bit weights, each with 3 outliers the MSE start clips, to
    a target that wants the outliers flipped (so their clipped gradients keep pushing
    the steps), by SGD with momentum as in the app's fine-tuning (lr 0.02, 0.9); returns
    the largest factor by which a step size moved off its start, up or down."""
    torch.manual_seed(seed)
    weight = torch.randn(16, 144) * 0.05
    weight[:, :3] *= 6
    target = weight.clone()
    target[:, :3] *= -1
    weight = nn.Parameter(weight)
    config = QuantConfig(weight_bits=8, learn_scale=True, scale_init="mse")
    quantizer = FakeQuantize.for_weights(config, 16).train()
    quantizer(weight)  # starts learning
    start = quantizer.scale.detach().clone()
    optimizer = torch.optim.SGD([weight, quantizer.scale], lr=0.02, momentum=0.9)
    worst = 1.0
    for _ in range(steps):
        x = torch.randn(256, 144)
        loss = (x @ quantizer(weight).t() - x @ target.t()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ratio = quantizer.scale.detach().clamp(min=1e-12) / start
        worst = max(worst, float(ratio.max()), float(1 / ratio.min()))
    return worst


def test_8_bit_weight_steps_do_not_run_away(monkeypatch):
    """LSQ's gradient scale at 8 bits lets clipped outliers drive a per-channel step to
    the floor (issue 12: 103 of ResNet-20's 794 channels 10x off within 60 steps); with
    the damping above 4 bits every step stays within a few times its start. The same
    problem undamped is shown to run away, so the test can fail."""
    drifts = [_worst_step_drift(seed) for seed in range(4)]
    assert max(drifts) < 10, drifts
    monkeypatch.setattr(learned_fake_quantize, "high_bits_damping", lambda bits: 1.0)
    undamped = [_worst_step_drift(seed) for seed in range(4)]
    assert max(undamped) > 1e3, undamped  # a step driven to the floor


def test_high_bits_damping_leaves_lsq_as_published_up_to_4_bits():
    assert [learned_fake_quantize.high_bits_damping(b) for b in (2, 3, 4)] == [1.0, 1.0, 1.0]
    assert learned_fake_quantize.high_bits_damping(8) == 1 / 64
    assert learned_fake_quantize.high_bits_damping(6) == pytest.approx(2**-3)


def test_step_gradient_is_the_same_for_a_channels_last_input_and_a_contiguous_gradient():
    torch.manual_seed(0)
    grads = []
    x = torch.randn(2, 3, 4, 5) * 2
    upstream = torch.randn(2, 3, 4, 5)
    for layout in (torch.contiguous_format, torch.channels_last):
        quantizer = learning_quantizer(3, False)
        out = quantizer(x.contiguous(memory_format=layout))
        (out * upstream).sum().backward()  # the gradient arrives contiguous
        grads.append((quantizer.scale.grad, quantizer.learned_zero_point.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_per_channel_weight_gradient_scale_counts_one_channel():
    torch.manual_seed(0)
    quantizer = learning_quantizer(3, True, weights=True, channels=4)
    w = torch.randn(4, 2, 3, 3)
    quantizer(w)
    assert quantizer.gradient_scale(w) == pytest.approx(1 / (18 * 3) ** 0.5)
    quantizer(w).sum().backward()
    assert quantizer.scale.grad.shape == (4,) and quantizer.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("weights", [False, True], ids=["act", "weight"])
def test_learned_grid_computes_what_the_observer_quantizer_computes(symmetric, weights):
    """Deployment reads ``scale`` and ``zero_point``: the learned quantizer's output is
    the plain fake quantizer's on the same grid, bit for bit."""
    torch.manual_seed(0)
    learned = learning_quantizer(4, symmetric, weights, channels=6)
    x = torch.randn(6, 5, 3, 3) + 0.7
    learned(x)
    with torch.no_grad():  # move the grid off its initial point, as training does
        learned.scale.mul_(1.173)
        if not symmetric:
            learned.learned_zero_point.add_(1.4)
    plain = FakeQuantize(learned.observer, learned.bits, symmetric, observe_in_eval=weights)
    plain.scale = learned.scale.detach().clone()
    plain.zero_point = learned.zero_point.clone()
    plain.enable_observer(False)
    learned.eval()
    with torch.no_grad():
        assert torch.equal(learned(x), plain(x))


def test_learning_the_step_lowers_the_error_below_the_best_fixed_range_start():
    """A 2-bit quantizer trained to reproduce its input moves its step from the full
    range (min/max) to a clipping range with much less error."""
    torch.manual_seed(0)
    config = QuantConfig(activation_bits=2, learn_scale=True, scale_init="minmax")
    quantizer = FakeQuantize.for_activations(config).train()
    x = torch.randn(64, 256)
    initial = (quantizer(x) - x).square().mean().item()  # starts learning at min/max
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.03)
    for _ in range(300):
        optimizer.zero_grad()
        (quantizer(x) - x).square().mean().backward()
        optimizer.step()
    final = (quantizer(x) - x).square().mean().item()
    _, high = mse_range(x, quantizer.quant_min, quantizer.quant_max, True)
    assert final < 0.5 * initial
    assert quantizer.scale.item() == pytest.approx(high.item() / quantizer.quant_max, rel=0.1)


def test_mse_range_clips_an_outlier_and_beats_the_full_range():
    torch.manual_seed(0)
    x = torch.randn(10_000)
    x[0] = 40.0
    _, high = mse_range(x, -7, 7, True)
    assert high < 10.0

    def error(hi):
        s = hi / 7
        return ((torch.clamp(torch.round(x / s), -7, 7) * s - x) ** 2).sum()

    assert error(high) < 0.5 * error(torch.tensor(40.0))
    _, per_channel_high = mse_range(torch.stack([x, x / 4]), -7, 7, True, ch_axis=0)
    torch.testing.assert_close(per_channel_high[1] * 4, per_channel_high[0], rtol=0.05, atol=0)


def test_lsq_initial_scale_is_two_mean_abs_over_root_qp():
    x = torch.tensor([[1.0, -3.0], [2.0, 2.0]])
    assert lsq_initial_scale(x, 4).item() == pytest.approx(2 * 2.0 / 2)
    torch.testing.assert_close(lsq_initial_scale(x, 4, ch_axis=0), torch.tensor([2.0, 2.0]))


def test_layer_bits_keep_the_first_and_last_layers_at_8_bits_and_size_shared_grids():
    model = prepare_qat(ResNetCifar(depth=8, in_channels=1), LSQ_W4A4)
    layers = list(quantized_layers(model))
    first, last = layers[0][1], layers[-1][1]
    assert (first.weight_quantizer.bits, last.weight_quantizer.bits) == (8, 8)
    assert last.activation_quantizer.bits == 8
    middle = [layer for _, layer in layers[1:-1]]
    assert middle and all(layer.weight_quantizer.bits == 4 for layer in middle)
    assert all(isinstance(q, LearnedScaleFakeQuantize) for _, q in quantizers(model))
    # a shared grid (residual add output) is as wide as the widest layer reading it
    for name, quantizer in quantizers(model):
        if name.endswith("output_quantizer"):
            readers = [layer for _, layer in layers if layer.activation_quantizer is quantizer]
            widths = [r.activation_quantizer.bits for r in readers]
            assert quantizer.bits == (max(widths) if readers else 4)  # an add's input: 4
    config = QuantConfig(weight_bits=4, layer_bits={"layer1.*": {"weight_bits": 6}})
    assert config.for_layer("layer1.0.conv1").weight_bits == 6
    assert config.for_layer("layer1.0.conv1").activation_bits == 8
    assert config.for_layer("layer2.0.conv1") is config
    assert QuantConfig(**config.to_dict()) == config
    with pytest.raises(ValueError, match="layer_bits"):
        QuantConfig(layer_bits={"fc": 9})
    with pytest.raises(ValueError, match="weight_bits and/or activation_bits"):
        QuantConfig(layer_bits={"fc": {"bits": 4}})
    with pytest.raises(ValueError, match="scale_init='best' is not one of minmax, mse, lsq"):
        QuantConfig(scale_init="best")
    with pytest.raises(ValueError, match="activation_symmetric='no'"):
        QuantConfig(activation_symmetric="no")
    with pytest.raises(ValueError, match="learn_scale=1 must be True or False"):
        QuantConfig(learn_scale=1)


def test_mse_calibration_quantizes_each_tensor_with_less_error_than_minmax():
    """PTQ at W4A4: the ranges ``mse`` picks quantize each layer's input and weights with
    less error than the full ranges do, on batches calibration did not see."""
    data = DigitsData()
    torch.manual_seed(0)
    float_model = ResNetCifar(depth=8, in_channels=1)
    optimizer = torch.optim.SGD(float_model.parameters(), lr=0.05, momentum=0.9)
    for x, y in data.train_dataloader():
        optimizer.zero_grad()
        nn.functional.cross_entropy(float_model(x), y).backward()
        optimizer.step()
    x = torch.cat([b[0] for b in data.val_dataloader()])
    errors = {}
    for method in ("minmax", "mse"):
        model = prepare_qat(
            copy.deepcopy(float_model).eval(),
            QuantConfig(weight_bits=4, activation_bits=4, quantize_first_input=True),
        )
        calibrate(model, data.train_dataloader(), method=method, num_batches=4)
        total = 0.0
        seen: dict = {}
        hooks = [
            q.register_forward_hook(lambda m, a, out, n=n, s=seen: s.__setitem__(n, (a[0], out)))
            for n, q in quantizers(model)
        ]
        with torch.no_grad():
            model(x)
        for hook in hooks:
            hook.remove()
        for tensor, quantized in seen.values():
            total += ((quantized - tensor).square().mean() / tensor.square().mean()).item()
        errors[method] = total / len(seen)
    assert errors["mse"] < 0.7 * errors["minmax"], errors


def run_lsq(tmp_path, name, start_epoch=1, ckpt_path=None, max_epochs=4, config=LSQ_W4A4):
    L.seed_everything(0, verbose=False)
    module = DigitsClassifier(arch="resnet8")
    callback = QuantizationAwareTraining(
        config,
        start_epoch=start_epoch,
        freeze_bn_epoch=2,
        freeze_observer_epoch=3,
        calibration_batches=2,
        verbose=False,
    )
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / name, filename="{epoch}", save_top_k=-1, every_n_epochs=1
    )
    trainer = L.Trainer(
        callbacks=[callback, checkpoints],
        **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True),
    )
    trainer.fit(module, DigitsData(), ckpt_path=ckpt_path)
    return module, trainer


class ScaleTrace(L.Callback):
    """The step sizes at every epoch's end, and which got a non-zero gradient in it."""

    def __init__(self):
        self.scales, self.pushed, self._pushed = [], [], set()

    def on_before_optimizer_step(self, trainer, module, optimizer):
        for n, q in quantizers(module):
            if q.scale.grad is not None and q.scale.grad.abs().sum() > 0:
                self._pushed.add(n)

    def on_train_epoch_end(self, trainer, module):
        self.scales.append({n: q.scale.detach().clone() for n, q in quantizers(module)})
        self.pushed.append(self._pushed)
        self._pushed = set()


@pytest.mark.parametrize("start_epoch", [0, 1])
def test_callback_learns_step_sizes_in_their_own_group_then_freezes_them(tmp_path, start_epoch):
    L.seed_everything(0, verbose=False)
    module = DigitsClassifier(arch="resnet8")
    trace = ScaleTrace()
    # QAT from random weights: the 8-bit first and last layers' steps must track weights
    # that grow, which the damping above 4 bits slows 64x (README, LSQ at 8 bits)
    config = dataclasses.replace(LSQ_W4A4, high_bits_damping=False)
    callback = QuantizationAwareTraining(
        config, start_epoch=start_epoch, freeze_observer_epoch=3, verbose=False
    )
    trainer = L.Trainer(callbacks=[callback, trace], **trainer_kwargs(tmp_path, max_epochs=5))
    trainer.fit(module, DigitsData())
    optimizer = trainer.optimizers[0]
    (group,) = [g for g in optimizer.param_groups if g.get("name") == QUANTIZER_GROUP]
    learned = quantizer_parameters(module)
    assert [id(p) for p in group["params"]] == [id(p) for p in learned]
    assert group["lr"] == optimizer.param_groups[0]["lr"]  # the scheduler drives it too
    others = {id(p) for g in optimizer.param_groups[:-1] for p in g["params"]}
    assert not others & {id(p) for p in learned}
    acts = [n for n, q in quantizers(module) if q.fake_quant_enabled and not q.holds_weights]
    # learning pushes every activation step in epoch 2 and moves them (an update can fall
    # below half a float32 ulp of its step: the 8-bit one before the pooled classifier
    # gets gradients near 1e-7 and stands still on some CPUs), not from epoch 3 on
    assert trace.pushed[2] >= set(acts)
    moved = [n for n in acts if not torch.equal(trace.scales[2][n], trace.scales[1][n])]
    assert len(moved) >= 0.75 * len(acts)
    assert all(torch.equal(trace.scales[4][n], trace.scales[3][n]) for n in acts)
    assert not trace.pushed[4] & set(acts)
    assert trainer.callback_metrics["val_acc"] > 0.8


def test_resume_with_learned_steps_ends_exactly_as_the_uninterrupted_run(tmp_path):
    full, _ = run_lsq(tmp_path, "full")
    expected = full.state_dict()
    for epoch in (0, 1, 3):
        ckpt = tmp_path / "full" / f"epoch={epoch}.ckpt"
        resumed, trainer = run_lsq(tmp_path, f"resumed{epoch}", ckpt_path=ckpt)
        got = resumed.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), f"{key} differs after resuming at {epoch}"
        assert len(trainer.optimizers[0].param_groups) == 2


def float_trained_resnet8(epochs: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = ResNetCifar(depth=8, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for x, y in DigitsData().train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


@pytest.mark.parametrize("bits", [4, 2])
def test_a_low_bit_lsq_residual_network_deploys_with_its_accuracy(bits, tmp_path):
    """Fine-tuned from float with learned steps, 4-bit and 2-bit grids (int8 codes
    within the narrow range) deploy to ONNX and the integer reference with the
    fake-quant model's accuracy."""
    config = QuantConfig(
        weight_bits=bits,
        activation_bits=bits,
        learn_scale=True,
        activation_symmetric=False,
        quantize_first_input=True,
        layer_bits={"@first": 8, "@last": 8},
    )
    model, data = train_qat_digits(config, model=float_trained_resnet8(), epochs=3, lr=0.01)
    x, y = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        fake_acc = (model(x).argmax(1) == y).float().mean().item()
    assert fake_acc > (0.9 if bits == 4 else 0.6)
    path = to_onnx(model, tmp_path / "resnet8.onnx", x[:1])
    # int8 codes within the low-bit range: onnxruntime runs every layer and add on its
    # integer kernels (its int4 types have no integer Conv/Gemm kernel on the CPU)
    ops = optimized_ops(path, tmp_path)
    assert not FLOAT_KERNELS & set(ops) and ops["QLinearConv"] > 0, ops
    for prefix, deployment in (("onnx", OnnxRuntimeModel(path)), ("int", to_integer(model))):
        result = evaluate_deployment(deployment, model, data.test_dataloader(), prefix)
        assert abs(result[f"{prefix}_test_acc"] - fake_acc) <= 0.003, result
        assert result[f"{prefix}_agreement"] >= 0.995, result


def test_bf16_autocast_learns_in_float32():
    torch.manual_seed(0)
    quantizer = learning_quantizer(4, False)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert quantizer.scale.grad is not None and torch.isfinite(quantizer.scale.grad).all()


class SameStepSizesOnEveryRank(L.Callback):
    """After every step of the converted model, both ranks hold the same step sizes,
    zero points and weights: the step sizes' gradients were averaged like any other."""

    def __init__(self):
        self.steps_checked = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        learned = quantizer_parameters(module)
        if not learned:
            return  # before conversion
        state = torch.cat([p.detach().flatten() for p in [*learned, *module.parameters()]])
        gathered = trainer.strategy.all_gather(state)
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree"
        self.steps_checked += 1

    def on_train_end(self, trainer, module):
        assert self.steps_checked > 0


@pytest.mark.parametrize("start_epoch", [0, 1], ids=["converted_before_ddp", "after_ddp"])
def test_two_process_ddp_learns_the_same_step_sizes_on_both_ranks(tmp_path, start_epoch):
    callback = QuantizationAwareTraining(
        LSQ_W4A4, start_epoch=start_epoch, freeze_observer_epoch=2, verbose=False
    )
    trainer = L.Trainer(
        callbacks=[callback, SameStepSizesOnEveryRank()],
        **trainer_kwargs(
            tmp_path,
            max_epochs=3,
            devices=2,
            strategy="ddp_spawn",
            deterministic=False,
            limit_train_batches=4,
        ),
    )
    trainer.fit(DigitsClassifier(arch="resnet8"), DigitsData())
    assert trainer.state.finished


class FirstQatStep(L.Callback):
    """The activation step sizes just before the first QAT step (after calibration)."""

    def __init__(self):
        self.scales = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.scales is None and quantizer_parameters(module):
            self.scales = {
                n: (q.scale.detach().clone(), q.observer_enabled, q.learning)
                for n, q in quantizers(module)
                if not q.holds_weights and q.fake_quant_enabled
            }


def test_mse_calibration_starts_the_learned_steps(tmp_path):
    L.seed_everything(0, verbose=False)
    module = DigitsClassifier(arch="resnet8")
    first = FirstQatStep()
    callback = QuantizationAwareTraining(
        LSQ_W4A4,
        start_epoch=1,
        calibration_batches=2,
        calibration_method="mse",
        verbose=False,
    )
    trainer = L.Trainer(callbacks=[callback, first], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(module, DigitsData())
    assert first.scales
    # calibrated, observers back on, learning not yet started: it starts from these
    assert all(enabled and not learning for _, enabled, learning in first.scales.values())
    final = dict(quantizers(module))
    moved = [n for n, (s, _, _) in first.scales.items() if not torch.equal(final[n].scale, s)]
    assert moved and all(final[n].learning for n in first.scales)
    with pytest.raises(ValueError, match="calibration_method='best'"):
        QuantizationAwareTraining(calibration_method="best", calibration_batches=2)
    with pytest.raises(ValueError, match="needs calibration_batches >= 1"):
        QuantizationAwareTraining(calibration_method="mse")


class _BlowUpAStep(L.Callback):
    """At the first epoch's last batch, sets one weight channel's learned step far above
    its weights (what 8-bit LSQ did to 104 of ResNet-20's 794 channels)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == trainer.num_training_batches - 1:
            with torch.no_grad():
                module.net[0].weight_quantizer.scale[2] = 1e3


def test_weight_channels_switched_off_by_their_steps_are_counted_each_epoch(tmp_path):
    logged = []
    for blow_up in (False, True):
        L.seed_everything(0, verbose=False)
        module = DigitsClassifier()
        callback = QuantizationAwareTraining(LSQ_W4A4, verbose=False)
        callbacks = [callback, _BlowUpAStep()] if blow_up else [callback]
        logger = CSVLogger(tmp_path, name=f"csv{blow_up}")
        kwargs = trainer_kwargs(tmp_path, max_epochs=2, logger=logger)
        L.Trainer(callbacks=callbacks, **kwargs).fit(module, DigitsData())
        rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
        column = rows[0].split(",").index("qat/zeroed_weight_channels")
        logged.append([float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]])
    baseline, blown = logged
    assert len(baseline) == 2  # each epoch's end
    assert blown == [n + 1 for n in baseline]  # the channel switched off, and only it


def test_zeroed_channels_are_those_with_weights_but_no_code():
    weight = torch.tensor([[0.0, 0.0], [1e-3, -1e-3], [1.0, 2.0]])  # pruned, off, alive
    quantized = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    assert zeroed_channels(weight, quantized) == [1]
    assert zeroed_channels(weight.t(), quantized.t(), ch_axis=1) == [1]
