"""`QuantConfig(oscillation_freezing=f_th)`: Nagel et al. 2022's iterative weight freezing,
tracked in the learned-step weight quantizer and annealed by the callback."""

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs
from test_learned_scale import LSQ_W4A4, run_lsq

from lightning_qat import (
    FakeQuantize,
    QuantConfig,
    QuantizationAwareTraining,
    quantized_layers,
    quantizers,
)
from lightning_qat.callback import FREEZING_START_THRESHOLD
from lightning_qat.export import evaluate_deployment, to_integer
from lightning_qat.quant.learned_fake_quantize import FREEZING_STATE


def weight_quantizer(freezing, channels=1, bits=4):
    config = QuantConfig(
        weight_bits=bits, activation_bits=bits, learn_scale=True, oscillation_freezing=freezing
    )
    return FakeQuantize.for_weights(config, channels).train()


def oscillating_toy(freezing, steps=200):
    """The toy problem of the paper (section 2.2) as in test_oscillation_dampening: each
    target lies between two grid points, so under the straight-through estimator the
    latent weight crosses the decision threshold back and forth. Returns the quantizer,
    the latent weights, the code flips in the last 100 steps and the codes at the end."""
    torch.manual_seed(0)
    quantizer = weight_quantizer(freezing)
    w = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 64).reshape(1, 64))
    quantizer(w)  # learning starts
    quantizer.enable_observer(False)  # a fixed grid: the weights alone move
    scale = float(quantizer.scale.detach())
    target = (torch.randint(-5, 5, (1, 64)) + 0.4) * scale
    optimizer = torch.optim.SGD([w], lr=0.2)
    codes, flips = None, 0
    for step in range(steps):
        optimizer.zero_grad()
        out = quantizer(w)
        ((out - target) ** 2).sum().backward()
        optimizer.step()
        now = torch.round(out.detach() / scale)
        if codes is not None and step >= steps // 2:
            flips += int((now != codes).sum())
        codes = now
    return quantizer, w, flips, codes


def test_oscillating_weights_freeze_and_stop_oscillating():
    _, _, flips_free, _ = oscillating_toy(0.0)
    quantizer, w, flips, codes = oscillating_toy(0.05)
    assert flips_free > 64 * 20, flips_free  # oscillating without freezing
    assert quantizer.frozen.all(), quantizer.frozen.float().mean()
    assert flips == 0, flips
    # frozen on the mean of the two codes it flipped between: one of the two
    target_code = torch.round(quantizer.frozen_codes)
    assert torch.equal(codes, quantizer.frozen_codes)
    # the latent weight no longer gets a gradient: it moves no more
    before = w.detach().clone()
    out = quantizer(w)
    out.sum().backward()
    assert torch.count_nonzero(w.grad) == 0
    assert torch.equal(w.detach(), before)
    assert torch.equal(out.detach(), target_code * quantizer.scale.detach())


def test_a_frozen_weight_gives_its_step_the_gradient_of_its_code():
    """``x_hat = s q_frozen``: ``d/dw = 0``, ``d/ds = g q_frozen`` (LSQ's ``g`` as for the
    other elements), the other elements' gradients as without freezing."""
    torch.manual_seed(0)
    w = torch.randn(3, 16) * 0.3
    upstream = torch.randn_like(w)
    results = []
    for freezing in (0.0, 0.5):
        quantizer = weight_quantizer(freezing, channels=3)
        quantizer(w.clone().requires_grad_(True))  # learning starts (and tracking)
        quantizer.scale.grad = None
        if freezing:
            frozen = torch.rand_like(w) < 0.3
            quantizer.frozen.copy_(frozen)
            quantizer.frozen_codes.copy_(torch.randint(-7, 8, w.shape).float())
            quantizer.freezing_threshold = 1.0  # nothing more freezes in this step
        latent = w.clone().requires_grad_(True)
        out = quantizer(latent)
        out.backward(upstream)
        results.append((out.detach(), latent.grad, quantizer.scale.grad.clone(), quantizer))
    (out, grad, scale_grad, plain), (out_f, grad_f, scale_grad_f, freezer) = results
    frozen, codes = freezer.frozen, freezer.frozen_codes
    scale = freezer.scale.detach().reshape(-1, 1)
    torch.testing.assert_close(out_f, torch.where(frozen, scale * codes, out), rtol=0, atol=0)
    assert torch.equal(grad_f, torch.where(frozen, 0.0, grad))
    g = freezer.gradient_scale(w)
    # the frozen elements' share of the free quantizer's step gradient, recomputed
    free_share = torch.zeros(3)
    for c in range(3):
        for i in torch.nonzero(frozen[c]).flatten():
            single = weight_quantizer(0.0, channels=3)
            single.load_state_dict(plain.state_dict())
            x = w.clone()
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask[c, i] = True
            single(x.requires_grad_(True)).backward(torch.where(mask, upstream, 0.0))
            free_share[c] += single.scale.grad[c]
    expected = scale_grad - free_share + g * (upstream * codes * frozen).sum(dim=1)
    torch.testing.assert_close(scale_grad_f, expected, rtol=1e-5, atol=1e-7)


def test_wide_layers_and_activations_are_not_tracked():
    assert not weight_quantizer(0.05, bits=8).oscillation_freezing
    activation = FakeQuantize.for_activations(
        dataclasses.replace(LSQ_W4A4, oscillation_freezing=0.05)
    )
    assert not getattr(activation, "oscillation_freezing", 0.0)
    assert not any(hasattr(activation, name) for name in FREEZING_STATE)


def test_the_freezing_state_survives_a_checkpoint():
    quantizer, w, _, _ = oscillating_toy(0.05, steps=14)
    assert 0 < int(quantizer.frozen.sum()) < 64  # some frozen, some not yet
    restored = weight_quantizer(0.05)
    restored.load_state_dict(quantizer.state_dict())
    for name in FREEZING_STATE:
        assert torch.equal(getattr(restored, name), getattr(quantizer, name)), name
    restored.train()
    assert torch.equal(restored(w.detach()), quantizer(w.detach()))


@pytest.mark.parametrize(
    "value",
    [-0.1, 1.0, True, "0.1", float("nan"), float("inf")],
    ids=["negative", "one", "bool", "string", "nan", "inf"],
)
def test_bad_freezing_thresholds_are_refused(value):
    with pytest.raises(ValueError, match="oscillation_freezing"):
        dataclasses.replace(LSQ_W4A4, oscillation_freezing=value)


def test_freezing_needs_learned_steps():
    with pytest.raises(ValueError, match="learn_scale"):
        QuantConfig(weight_bits=4, oscillation_freezing=0.02)


class Thresholds(L.Callback):
    def __init__(self):
        self.thresholds = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        (threshold,) = {
            q.freezing_threshold for _, q in quantizers(module) if q.oscillation_freezing
        } or {None}
        self.thresholds.append(threshold)


def test_the_callback_anneals_the_threshold_and_the_model_deploys_frozen(tmp_path):
    """The threshold goes from 0.1 at ``start_epoch`` to ``f_th`` at the last epoch's end
    on a cosine; ``qat/frozen_weights`` counts what froze; the integer model computes
    with the frozen codes (it reads them from the quantizers, as the fake-quant model)."""
    # the input quantized in training too: the integer model is then the fake-quant one
    config = dataclasses.replace(LSQ_W4A4, oscillation_freezing=0.01, quantize_first_input=True)
    recorder = Thresholds()
    qat = QuantizationAwareTraining(config, start_epoch=1, verbose=False)
    logger = CSVLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, max_epochs=4, logger=logger)
    trainer = L.Trainer(callbacks=[qat, recorder], **kwargs)
    model, data = DigitsClassifier(arch="resnet8"), DigitsData()
    trainer.fit(model, data)
    batches = trainer.num_training_batches
    thresholds = recorder.thresholds
    assert thresholds[:batches] == [None] * batches  # float epoch: no quantizers
    t = torch.arange(3 * batches, dtype=torch.float64) / (3 * batches)
    expected = 0.01 + (FREEZING_START_THRESHOLD - 0.01) * (1 + torch.cos(torch.pi * t)) / 2
    torch.testing.assert_close(torch.tensor(thresholds[batches:], dtype=torch.float64), expected)
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("qat/frozen_weights")
    frozen = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert len(frozen) == 3  # each QAT epoch's end
    assert frozen == sorted(frozen) and frozen[-1] > 0, frozen  # frozen for good
    tracked = [q for _, q in quantizers(model) if q.oscillation_freezing]
    assert tracked and all(q.bits <= 4 for q in tracked)
    assert frozen[-1] == pytest.approx(
        sum(int(q.frozen.sum()) for q in tracked) / sum(q.frozen.numel() for q in tracked)
    )
    model.eval()
    for _, layer in quantized_layers(model):  # the weights as the export reads them
        quantizer = layer.weight_quantizer
        if quantizer.oscillation_freezing:
            step = quantizer.scale.detach().reshape(-1, 1, 1, 1)
            codes = torch.round(quantizer(layer.weight_to_quantize()).detach() / step)
            assert torch.equal(codes[quantizer.frozen], quantizer.frozen_codes[quantizer.frozen])
    result = evaluate_deployment(to_integer(model.net), model.net, data.test_dataloader(), "int")
    assert result["int_agreement"] >= 0.99, result


def test_a_compiled_step_tracks_and_freezes_as_an_eager_one():
    """The tracking runs outside the compiled graph (``torch.compiler.disable``); the
    frozen codes are applied inside it. One step from the same state, every weight set
    to oscillate in it: the same state and the same output either way."""
    import copy

    from torch import nn

    from lightning_qat import prepare_qat

    torch.manual_seed(0)
    convs = [nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)]  # 4 bits between
    model = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2], nn.Flatten())
    model = prepare_qat(model, dataclasses.replace(LSQ_W4A4, oscillation_freezing=0.02)).train()
    x = torch.randn(4, 1, 8, 8)
    model(x)  # learning and tracking start (eager)
    quantizer = model[2].weight_quantizer
    # each code one below the last, which moved up: an oscillation for every weight, and
    # a frequency that crosses the threshold with it
    quantizer.previous_codes.add_(1)
    quantizer.previous_direction.fill_(1)
    quantizer.oscillation_frequency.fill_(0.0195)
    quantizer.mean_codes.add_(0.25)
    states, outputs = [], []
    for compiled in (False, True):
        twin = copy.deepcopy(model)
        step = torch.compile(twin) if compiled else twin
        step(x).sum().backward()
        q = twin[2].weight_quantizer
        states.append({name: getattr(q, name).clone() for name in FREEZING_STATE})
        outputs.append(step(x).detach())
    assert states[0]["frozen"].all()
    for name in FREEZING_STATE:
        assert torch.equal(states[0][name], states[1][name]), name
    torch.testing.assert_close(outputs[0], outputs[1])


def test_a_run_resumed_mid_freezing_ends_as_the_uninterrupted_one(tmp_path):
    """The tracking state (frequencies, last codes and directions, mean codes, what is
    frozen and on which code) is in the checkpoint: resumed after the first QAT epoch or
    the second, the run ends on the uninterrupted run's weights, steps and frozen codes."""
    config = dataclasses.replace(LSQ_W4A4, oscillation_freezing=0.01)
    full, _ = run_lsq(tmp_path, "full", config=config)
    expected = full.state_dict()
    frozen = [key for key in expected if key.endswith(".frozen")]
    assert frozen and sum(int(expected[key].sum()) for key in frozen) > 0
    for epoch in (1, 2):
        ckpt = tmp_path / "full" / f"epoch={epoch}.ckpt"
        resumed, _ = run_lsq(tmp_path, f"resumed{epoch}", ckpt_path=ckpt, config=config)
        got = resumed.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), f"{key} differs after resuming at {epoch}"


class SameFreezingOnEveryRank(L.Callback):
    """After every QAT step both ranks hold the same tracking state and frozen codes (the
    weights are the same on both, so the codes are; nothing is communicated)."""

    def __init__(self):
        self.steps_checked = 0
        self.frozen = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        tracked = [q for _, q in quantizers(module) if getattr(q, "oscillation_freezing", 0)]
        if not tracked or not tracked[0].frozen.numel():
            return
        state = torch.cat(
            [getattr(q, n).flatten().float() for q in tracked for n in FREEZING_STATE]
        )
        gathered = trainer.strategy.all_gather(state)
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree on the freezing state"
        self.steps_checked += 1
        self.frozen = sum(int(q.frozen.sum()) for q in tracked)

    def on_train_end(self, trainer, module):
        assert self.steps_checked > 0 and self.frozen > 0, (self.steps_checked, self.frozen)


def test_two_process_ddp_freezes_the_same_weights_on_both_ranks(tmp_path):
    config = dataclasses.replace(LSQ_W4A4, oscillation_freezing=0.01)
    callback = QuantizationAwareTraining(config, start_epoch=0, verbose=False)
    trainer = L.Trainer(
        callbacks=[callback, SameFreezingOnEveryRank()],
        **trainer_kwargs(
            tmp_path, max_epochs=3, devices=2, strategy="ddp_spawn", deterministic=False
        ),
    )
    trainer.fit(DigitsClassifier(arch="resnet8"), DigitsData())
    assert trainer.state.finished
