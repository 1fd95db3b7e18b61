"""Lightning's ModelPruning with QAT, both callback orders, pruning before and after the
conversion: the quantized layers train and deploy the pruned weights at the asked sparsity.

On main, ModelPruning pruned the float modules it collected before the conversion
replaced them (sparsity 0 in the trained model), and a model pruned before the
conversion crashed it (``cannot assign 'torch.FloatTensor' as parameter 'weight'``)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelPruning
from lightning_helpers import DigitsClassifier, DigitsData, trainer_kwargs
from torch.nn.utils import prune

from lightning_qat import QuantConfig, QuantizationAwareTraining, prepare_qat, quantized_layers
from lightning_qat.export import plan_deployment, to_integer


def _sparsity(tensor: torch.Tensor) -> float:
    return float((tensor == 0).float().mean())


def _fit(tmp_path, order: str, start_epoch: int, epochs: int, config=None):
    pruning = ModelPruning(
        "l1_unstructured", amount=0.5, parameter_names=["weight"], make_pruning_permanent=False
    )
    qat = QuantizationAwareTraining(config or QuantConfig(), start_epoch=start_epoch, verbose=False)
    callbacks = [pruning, qat] if order == "pruning_first" else [qat, pruning]
    module = DigitsClassifier()
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=epochs))
    trainer.fit(module, DigitsData())
    return module, trainer


@pytest.mark.parametrize("order", ["pruning_first", "qat_first"])
@pytest.mark.parametrize("start_epoch", [0, 1], ids=["convert_at_setup", "convert_after_pruning"])
def test_quantized_layers_train_and_deploy_the_pruned_weights(tmp_path, order, start_epoch):
    """Pruned at the end of epochs 0 and 1 (50% of the remaining each time: 75%), with the
    conversion before any pruning or between the two."""
    module, trainer = _fit(tmp_path, order, start_epoch, epochs=2)
    layers = dict(quantized_layers(module))
    assert set(layers) == {"net.0", "net.4", "net.9", "net.11"}
    # ModelPruning prunes globally (its default): 75% of all the weights it collected, in
    # the live model (conv, folded BN gammas, linear)
    pruning = next(c for c in trainer.callbacks if isinstance(c, ModelPruning))
    live = dict(module.named_modules())
    targets = [(m, n) for m, n in pruning._parameters_to_prune]
    assert all(any(m is x for x in live.values()) for m, _ in targets)
    masks = torch.cat([getattr(m, f"{n}_mask").flatten() for m, n in targets])
    assert _sparsity(masks) == pytest.approx(0.75, abs=0.002)
    for name, layer in layers.items():
        # the live weight is the mask times the trained Parameter
        assert isinstance(layer.weight_orig, torch.nn.Parameter), name
        assert _sparsity(layer.weight_mask) > 0.1, name
        assert torch.equal(layer.weight, layer.weight_orig * layer.weight_mask), name
        # the Parameter is the optimizer's (it trained through the mask)
        optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        assert id(layer.weight_orig) in optimized
    # the deployment quantizes the pruned weights: every masked weight deploys as 0
    plan = plan_deployment(module.net)
    for step in plan.steps:
        codes = getattr(step, "weight_codes", None)
        if codes is None:
            continue
        layer = layers[f"net.{step.name}"]
        zero = step.weight_zero_point.reshape(-1, *[1] * (codes.dim() - 1))
        masked = layer.weight_mask == 0
        assert bool((codes[masked] == zero.expand_as(codes)[masked]).all()), step.name
    integer = to_integer(module.net)
    x = torch.randn(4, 1, 8, 8)
    assert integer(x).shape == (4, 10)


def test_asymmetric_weights_keep_pruned_zeros_exact(tmp_path):
    config = QuantConfig(symmetric=False)
    module, _ = _fit(tmp_path, "pruning_first", 0, epochs=1, config=config)
    for name, layer in quantized_layers(module):
        weight = layer.weight_to_quantize().detach()
        quantized = layer.weight_quantizer(weight)
        masked = layer.weight_mask == 0
        assert bool((quantized[masked] == 0).all()), name


def test_prepare_qat_accepts_a_model_pruned_by_hand():
    """torch.nn.utils.prune on the float model, then conversion: the masks come along
    and later updates of the Parameter stay masked."""
    model = DigitsClassifier().net
    for module in (model[0], model[1], model[11]):  # conv, its BN (folded), linear
        prune.l1_unstructured(module, "weight", amount=0.5)
    prepare_qat(model, QuantConfig())
    conv, linear = model[0], model[11]
    for layer in (conv, linear, model[1]):
        assert _sparsity(layer.weight_mask) == 0.5
    with torch.no_grad():
        conv.weight_orig.add_(1.0)
        model[1].weight_orig.add_(1.0)
    model.eval()
    model(torch.randn(2, 1, 8, 8))
    assert _sparsity(conv.weight) == 0.5 and torch.equal(
        conv.weight, conv.weight_orig * conv.weight_mask
    )
    # the folded BN scale uses the pruned gamma: channels whose gamma is pruned fold to 0
    folded = conv.weight_to_quantize()
    dead = model[1].weight_mask == 0
    assert bool((folded[dead] == 0).all()) and bool((folded[~dead] != 0).any())
