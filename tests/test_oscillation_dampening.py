"""`QuantConfig(oscillation_dampening=λ)`: Nagel et al. 2022's dampening loss, added in the
learned-step weight quantizer's backward pass and ramped by the callback."""

import dataclasses

import lightning as L
import pytest
import torch
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs
from test_learned_scale import LSQ_W4A4

from lightning_qat import FakeQuantize, QuantConfig, QuantizationAwareTraining, quantizers


def weight_quantizer(dampening, channels=4, bits=4):
    config = QuantConfig(
        weight_bits=bits, activation_bits=bits, learn_scale=True, oscillation_dampening=dampening
    )
    return FakeQuantize.for_weights(config, channels).train()


def _gradients(quantizer, w, upstream):
    w = w.clone().requires_grad_(True)
    out = quantizer(w)
    out.backward(upstream)
    scale_grad = quantizer.scale.grad  # (None where the steps are frozen and undamped)
    return out.detach(), w.grad, torch.zeros(4) if scale_grad is None else scale_grad.clone()


@pytest.mark.parametrize("observing", [True, False], ids=["learning", "steps-frozen"])
def test_the_weight_gradient_gains_the_dampening_loss_gradient(observing):
    """``d/dw λ Σ (w_hat - clip(w))²`` with ``w_hat`` constant is ``2 λ (w - w_hat)`` in
    range and 0 where clipped; the step sizes' gradients do not change. Also once the
    steps are frozen (the loss is on the weights, not on the steps)."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * 0.3
    upstream = torch.randn_like(w)
    results = []
    for dampening in (0.0, 0.25):
        quantizer = weight_quantizer(dampening)
        quantizer(w.clone().requires_grad_(True))  # learning starts
        quantizer.scale.data.fill_(0.05)  # a step that clips the larger weights
        quantizer.scale.grad = None
        quantizer.enable_observer(observing)
        results.append(_gradients(quantizer, w, upstream))
    (out, plain, plain_scale), (out_damped, damped, damped_scale) = results
    assert torch.equal(out, out_damped)
    scale = quantizer.scale.detach().reshape(-1, 1, 1, 1)
    in_range = (w / scale).round().abs() <= quantizer.quant_max
    assert 0.1 < in_range.float().mean() < 0.9
    expected = torch.where(in_range, 2 * 0.25 * (w - out), 0.0)
    torch.testing.assert_close(damped - plain, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(damped_scale, plain_scale, rtol=0, atol=0)


def test_activations_and_evaluation_are_not_dampened():
    config = dataclasses.replace(LSQ_W4A4, oscillation_dampening=0.5)
    activation = FakeQuantize.for_activations(config).train()
    assert float(activation.dampening_weight) == 0.0
    quantizer = weight_quantizer(0.5)
    w = torch.randn(4, 8).requires_grad_(True)
    quantizer(w)  # learning starts
    quantizer.eval()
    out = quantizer(w)
    out.backward(torch.ones_like(out))
    scale = quantizer.scale.detach().reshape(-1, 1)
    in_range = (w.detach() / scale).round().abs() <= quantizer.quant_max
    assert torch.equal(w.grad, in_range.float())  # the straight-through gradient alone


def test_dampening_stops_a_weight_oscillating_between_two_codes():
    """The paper's toy problem (section 2.2): the target lies between two grid points,
    so with the straight-through estimator the latent weight crosses the decision
    threshold back and forth and its code flips nearly every other step; the dampening
    loss holds it in its bin."""
    flips = {}
    for dampening in (0.0, 2.0):
        torch.manual_seed(0)
        quantizer = weight_quantizer(dampening, channels=1)
        w = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 64).reshape(1, 64))
        quantizer(w)  # learning starts
        quantizer.enable_observer(False)  # a fixed grid: the weights alone move
        scale = float(quantizer.scale)
        target = (torch.randint(-5, 5, (1, 64)) + 0.4) * scale  # between two codes
        optimizer = torch.optim.SGD([w], lr=0.2)
        codes, count = None, 0
        for step in range(200):
            optimizer.zero_grad()
            out = quantizer(w)
            ((out - target) ** 2).sum().backward()
            optimizer.step()
            now = torch.round(out.detach() / scale)
            if codes is not None and step >= 100:
                count += int((now != codes).sum())
            codes = now
        flips[dampening] = count
    assert flips[0.0] > 64 * 20, flips  # oscillating
    assert flips[2.0] < flips[0.0] / 10, flips


@pytest.mark.parametrize(
    "value",
    [-0.1, True, "0.1", float("nan"), float("inf")],
    ids=["negative", "bool", "string", "nan", "inf"],
)
def test_bad_dampening_values_are_refused(value):
    with pytest.raises(ValueError, match="oscillation_dampening"):
        dataclasses.replace(LSQ_W4A4, oscillation_dampening=value)


def test_dampening_needs_learned_steps():
    with pytest.raises(ValueError, match="learn_scale"):
        QuantConfig(weight_bits=4, oscillation_dampening=0.1)


class DampeningWeights(L.Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        (weight,) = {
            float(q.dampening_weight) for _, q in quantizers(module) if q.oscillation_dampening
        } or {None}
        self.weights.append(weight)


def test_the_callback_ramps_the_weight_from_0_on_a_cosine(tmp_path):
    """From ``start_epoch`` (0) to ``λ`` at the end of the last epoch:
    ``λ (1 - cos(π t)) / 2`` at each batch (recorded after the QAT callback set it)."""
    config = dataclasses.replace(LSQ_W4A4, oscillation_dampening=0.3)
    recorder = DampeningWeights()
    qat = QuantizationAwareTraining(config, start_epoch=1, verbose=False)
    trainer = L.Trainer(callbacks=[qat, recorder], **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(DigitsClassifier(arch="resnet8"), DigitsData())
    batches = trainer.num_training_batches
    weights = recorder.weights
    assert len(weights) == 3 * batches
    assert weights[:batches] == [None] * batches  # float epoch: no quantizers
    t = torch.arange(2 * batches, dtype=torch.float64) / (2 * batches)
    expected = 0.3 * (1 - torch.cos(torch.pi * t)) / 2
    torch.testing.assert_close(torch.tensor(weights[batches:], dtype=torch.float64), expected)


def test_a_compiled_step_does_not_recompile_as_the_weight_ramps():
    """The weight is a tensor the callback fills in place: a Python float would be a
    constant of the compiled graph, recompiled for every value of the ramp."""
    from torch import nn

    from lightning_qat import prepare_qat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    model = prepare_qat(model, dataclasses.replace(LSQ_W4A4, oscillation_dampening=0.1)).train()
    x = torch.randn(4, 1, 8, 8)
    model(x)  # learning starts (eager)
    torch._dynamo.reset()  # other tests' compilations of the same forward are not recompiles
    compiled = torch.compile(model)
    gradients = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for weight in (0.0, 0.05, 0.1):
            for _, quantizer in quantizers(model):
                if quantizer.oscillation_dampening:
                    quantizer.dampening_weight.fill_(weight)
            model.zero_grad()
            compiled(x).sum().backward()
            gradients.append(model[0].weight.grad.clone())
    assert not torch.equal(gradients[0], gradients[2])  # the weight reached the graph
