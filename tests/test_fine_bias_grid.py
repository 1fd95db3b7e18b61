"""`QuantConfig(fine_bias_grid=True)`: the int32 bias of a low-bit layer on a grid
``2^(8-b)`` times finer than ``s_x s_w``, the weight codes stored times ``2^(8-b)``."""

import dataclasses

import pytest
import torch
from qat_digits import train_qat_digits
from test_learned_scale import LSQ_W4A4, float_trained_resnet8
from torch import nn

from lightning_qat import QuantConfig
from lightning_qat.export import OnnxRuntimeModel, evaluate_deployment, to_integer, to_onnx
from lightning_qat.export.plan import QuantizedLayer, plan_deployment
from lightning_qat.nn import QuantConv2d
from lightning_qat.nn.layer import bias_grid_refinement

W2A2 = dataclasses.replace(
    LSQ_W4A4,
    weight_bits=2,
    activation_bits=2,
    quantize_first_input=True,
    weight_narrow_range=False,
)


def test_the_refinement_is_the_spare_bits_of_symmetric_low_bit_weights():
    fine = QuantConfig(fine_bias_grid=True, weight_bits=2)
    assert bias_grid_refinement(fine) == 64
    assert bias_grid_refinement(dataclasses.replace(fine, weight_bits=4)) == 16
    assert bias_grid_refinement(dataclasses.replace(fine, weight_bits=8)) == 1
    assert bias_grid_refinement(dataclasses.replace(fine, symmetric=False)) == 1
    assert bias_grid_refinement(QuantConfig(weight_bits=2)) == 1


def test_the_training_forward_rounds_the_bias_on_the_finer_grid():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    layer = QuantConv2d.from_float(conv, QuantConfig(weight_bits=2, fine_bias_grid=True))
    x = torch.randn(8, 3, 6, 6)
    layer.train()(x)  # observes the ranges
    layer.eval()
    scale = layer.activation_quantizer.scale * layer.weight_quantizer.scale / 64
    expected = torch.round(layer.bias / scale) * scale
    got = layer.quantized_bias(layer.bias)
    assert torch.equal(got, expected.to(got.dtype))
    coarse = torch.round(layer.bias / (scale * 64)) * scale * 64
    assert not torch.equal(got, coarse)  # the grids differ on these values


@pytest.mark.parametrize(
    "folding", [{"bn_fold": False}, {"folded_step_units": "weight"}, {}], ids=str
)
def test_a_2_bit_residual_network_deploys_its_fine_bias_grid(folding, tmp_path):
    """ResNet-8 at W2A2 (first and last layers 8-bit): BatchNorm unfolded, folded with
    the step in the weight's units, and folded. The export's 2-bit weight codes are
    multiples of 64 in int8 (four levels a channel at most) and the integer reference
    and onnxruntime compute the fake-quant model's top-1 (folded: as trained)."""
    config = dataclasses.replace(W2A2, fine_bias_grid=True, **folding)
    model, data = train_qat_digits(config, model=float_trained_resnet8(), epochs=3, lr=0.01)
    layers = [s for s in plan_deployment(model) if isinstance(s, QuantizedLayer)]
    two_bit = [s for s in layers if (s.weight_codes % 64 == 0).all()]
    assert len(two_bit) == len(layers) - 2  # all but the 8-bit first and last
    for step in two_bit:
        assert step.weight_codes.min() >= -128 and step.weight_codes.max() <= 127
        for channel in step.weight_codes.flatten(1):
            assert channel.unique().numel() <= 4
    x, _ = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))
    path = to_onnx(model, tmp_path / "resnet8.onnx", x[:1])
    # (unfolded, the BatchNorm's shift is float in training: finer, not exact)
    least = 0.98 if folding == {"bn_fold": False} else 0.995
    for prefix, deployment in (("onnx", OnnxRuntimeModel(path)), ("int", to_integer(model))):
        result = evaluate_deployment(deployment, model, data.test_dataloader(), prefix)
        assert result[f"{prefix}_agreement"] >= least, result


def test_an_unfolded_batchnorm_deploys_closer_on_the_fine_grid():
    """An unfolded BatchNorm's shift is float in training and lands on the bias grid in
    deployment: 64 times finer, the integer model's logits move far less."""
    model, data = train_qat_digits(
        dataclasses.replace(W2A2, bn_fold=False), model=float_trained_resnet8(), epochs=2, lr=0.01
    )
    x, _ = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        logits = model(x)
    errors = {}
    for refinement in (1, 64):
        for layer in model.modules():
            if hasattr(layer, "bias_grid_refinement") and layer.weight_quantizer.bits == 2:
                layer.bias_grid_refinement = refinement
        errors[refinement] = (to_integer(model)(x) - logits).abs().mean().item()
    assert errors[64] < errors[1] / 4, errors
