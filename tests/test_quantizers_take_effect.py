"""The fast-path trap of issue 14, for every model the app trains: in eval under
``torch.no_grad()``, each quantized module's output must change when fake quantization
is switched off. A module bypassed by a fused path (torch's transformer fast path ran
the float weights and skipped every quantizer) fails this, whatever it reports."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_qat import QuantConfig, prepare_qat, quantized_layers, quantizers
from lightning_qat.app.models import NIN, LeNet, mobilenet_v2_cifar, resnet20, vit_tiny

MODELS = {
    "lenet": (lambda: LeNet(), (2, 1, 28, 28)),
    "nin": (lambda: NIN(), (2, 3, 32, 32)),
    "resnet20": (lambda: resnet20(), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: mobilenet_v2_cifar(width_mult=0.25), (2, 3, 32, 32)),
    "vit_tiny": (lambda: vit_tiny(width=32, depth=2, heads=2), (2, 3, 32, 32)),
    "transformer_encoder": (
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True),
            2,
            enable_nested_tensor=False,
        ),
        (2, 5, 16),
    ),
    "transformer_decoder_layer": (
        lambda: _SelfDecoding(nn.TransformerDecoderLayer(16, 2, 32, 0.0, batch_first=True)),
        (2, 5, 16),
    ),
}


class _SelfDecoding(nn.Module):
    """A decoder layer attending to its own input as memory (one input to feed)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, x * 2)


def _recording(forward, record: list[torch.Tensor]):
    def recorded(*args, **kwargs):
        out = forward(*args, **kwargs)
        record.append((out[0] if isinstance(out, tuple) else out).clone())
        return out

    return recorded


@pytest.mark.parametrize("name", list(MODELS))
def test_every_quantized_module_output_changes_with_fake_quant_off(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float islands are named; tested elsewhere
        model = prepare_qat(build(), QuantConfig())
    x = torch.randn(shape)
    model.train()
    model(x)  # the observers set the grids
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {}
    layers = dict(quantized_layers(model))
    for layer_name, layer in layers.items():
        # a wrapped forward, not a hook: torch's fused paths turn off where hooks are
        layer.forward = _recording(layer.forward, outputs.setdefault(layer_name, []))
    with torch.no_grad():
        model(x)
        for _, quantizer in quantizers(model):
            quantizer.enable_fake_quant(False)
        model(x)
    assert layers
    unchanged = [n for n in layers if len(outputs[n]) != 2 or torch.equal(*outputs[n])]
    assert not unchanged, f"quantization has no effect in eval on {unchanged}"
