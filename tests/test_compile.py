"""torch.compile: a QAT training step of LeNet, ResNet-20 and NIN compiles into one graph
(``fullgraph=True``: no graph break in the forward, the backward traced with it), computes
what eager computes, and ``Trainer.fit`` of a compiled LightningModule runs the callback
with the conversion at set-up or at a later epoch.

On main, dynamo broke a QAT LeNet step 14 times: the observers' non-finite check read a
flag on the host (``bool``), the clipping statistics did (``int``), and two fused
fake-quant kernels have no fake-tensor kernel in torch."""

import lightning as L
import pytest
import torch
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs
from torch import nn

from lightning_qat import QuantConfig, QuantizationAwareTraining, prepare_qat, quantizers
from lightning_qat.app.models import NIN, LeNet, resnet20

MODELS = {
    "lenet": (lambda: LeNet(image_size=8, widths=(8, 16, 32)), (8, 1, 8, 8)),
    "resnet20": (resnet20, (4, 3, 32, 32)),
    "nin": (lambda: NIN(widths=[16, 12, 8, 16, 16, 16, 16, 16]), (4, 3, 32, 32)),
}


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(symmetric=False, bn_fold=False)])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_qat_training_step_compiles_to_one_graph_and_matches_eager(name, config):
    build, shape = MODELS[name]
    torch._dynamo.reset()  # earlier tests' compilations count against the recompile limit
    torch.manual_seed(0)
    eager = prepare_qat(build(), config).train()
    torch.manual_seed(0)
    compiled_model = prepare_qat(build(), config).train()
    # the callback's clipping sample runs in the compiled graph too
    for model in (eager, compiled_model):
        for _, quantizer in quantizers(model):
            quantizer.clipping_counts = {"clipped": 0, "total": 0}
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(shape)
    for _ in range(2):  # the second step reads the ranges the first one observed
        out_e, grads_e = _step(eager, x)
        out_c, grads_c = _step(compiled, x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        for g_c, g_e in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)
    for (name_e, q_e), (_, q_c) in zip(quantizers(eager), quantizers(compiled_model), strict=True):
        assert torch.equal(q_e.scale, q_c.scale), name_e
        assert int(q_e.clipping_counts["clipped"]) == int(q_c.clipping_counts["clipped"])


def _compiled_fit(tmp_path, callbacks) -> tuple[L.Trainer, set[str], int]:
    """Fit a compiled DigitsClassifier; the graph-break reasons and the graph count."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    module = DigitsClassifier()
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(torch.compile(module, backend="aot_eager"), DigitsData())
    counters = torch._dynamo.utils.counters
    return trainer, set(counters["graph_break"]), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("start_epoch", [0, 1], ids=["convert_at_setup", "convert_at_epoch_1"])
def test_fit_of_a_compiled_module_with_the_callback(tmp_path, start_epoch):
    """Lightning compiles the module's step functions, whose ``self.log`` calls break the
    graph whatever the model; QAT adds no break of its own, and few graphs: one for the
    epochs' sampled clipping statistics, and (with a later start) one recompilation of
    the converted model."""
    _, fp32_breaks, fp32_graphs = _compiled_fit(tmp_path / "fp32", [])
    callback = QuantizationAwareTraining(QuantConfig(), start_epoch=start_epoch, verbose=False)
    trainer, breaks, graphs = _compiled_fit(tmp_path / "qat", [callback])
    assert breaks <= fp32_breaks, breaks - fp32_breaks
    assert graphs <= fp32_graphs + (2 if start_epoch == 0 else 4), (graphs, fp32_graphs)
    assert callback.phase == "qat"
    assert any(True for _ in quantizers(trainer.lightning_module))
    assert trainer.callback_metrics["val_acc"] > 0.7


@pytest.mark.parametrize("name", ["resnet20"])
def test_a_learned_step_qat_step_compiles_to_one_graph_once_learning(name):
    """LSQ: the step sizes' start (one eager step: an MSE search on the first batch) is
    left to eager; from then on a training step is one graph with eager's gradients,
    the step sizes' among them."""
    build, shape = MODELS[name]
    config = QuantConfig(
        weight_bits=4, activation_bits=4, activation_symmetric=False, learn_scale=True
    )
    torch.manual_seed(0)
    eager = prepare_qat(build(), config).train()
    torch.manual_seed(0)
    compiled_model = prepare_qat(build(), config).train()
    x = torch.randn(shape)
    _step(eager, x)
    _step(compiled_model, x)  # starts learning in eager
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        out_e, grads_e = _step(eager, x)
        out_c, grads_c = _step(compiled, x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        assert len(grads_c) == len(grads_e)
        for g_c, g_e in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
