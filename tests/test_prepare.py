"""prepare_qat: pair finding, in-place conversion, Parameter identity, forward untouched."""

import inspect

import pytest
import torch
import torchvision
from torch import nn

from lightning_qat import (
    FoldedBatchNorm2d,
    QuantConfig,
    QuantConv2d,
    QuantConvBn2d,
    QuantLinear,
    find_conv_bn_pairs,
    prepare_qat,
    quantizers,
)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),  # no BN after it
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class AttributeNet(nn.Module):
    """forward uses attributes, the BN of conv_b is declared far from its conv."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.bn_b = nn.BatchNorm2d(8)

    def forward(self, x, *, scale: float = 1.0):
        x = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.relu(self.bn_b(self.conv_b(x))) + x
        return self.fc(x.mean((2, 3))) * scale


class BranchyNet(AttributeNet):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        x = self.bn_a(self.conv_a(x))
        if x.sum() > 0:
            x = x + 1
        x = self.block(self.bn_b(self.conv_b(x)))
        return self.fc(x.mean((2, 3)))


def test_sequential_pairs_fold_and_the_rest_is_quantized():
    model = prepare_qat(small_cnn(), QuantConfig())
    kinds = [type(m) for m in model]
    assert kinds[0] is QuantConvBn2d and kinds[1] is FoldedBatchNorm2d
    assert kinds[3] is QuantConvBn2d and kinds[4] is FoldedBatchNorm2d
    assert kinds[6] is QuantConv2d and kinds[9] is QuantLinear
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_unfolded_keeps_float_batchnorm():
    model = prepare_qat(small_cnn(), QuantConfig(bn_fold=False))
    assert type(model[0]) is QuantConv2d and type(model[1]) is nn.BatchNorm2d


def test_attribute_model_pairs_found_by_tracing_and_forward_untouched():
    model = AttributeNet()
    forward, signature = type(model).forward, inspect.signature(model.forward)
    assert find_conv_bn_pairs(model) == [("conv_a", "bn_a"), ("conv_b", "bn_b")]
    prepare_qat(model, QuantConfig())
    assert isinstance(model.conv_a, QuantConvBn2d) and isinstance(model.bn_b, FoldedBatchNorm2d)
    assert type(model).forward is forward and "forward" not in vars(model)
    assert inspect.signature(model.forward) == signature
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x, scale=2.0), 2 * model(x))  # keyword arguments reach it


def test_untraceable_model_warns_and_folds_only_inside_sequential():
    with pytest.warns(
        UserWarning, match=r"could not trace BranchyNet.*calls bn_a, bn_b.*fuse_pairs"
    ):
        model = prepare_qat(BranchyNet(), QuantConfig())
    assert isinstance(model.block[0], QuantConvBn2d)  # Sequential: order is known
    assert isinstance(model.conv_a, QuantConv2d) and isinstance(model.bn_a, nn.BatchNorm2d)
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_explicit_pairs_fold_an_untraceable_model():
    model = prepare_qat(BranchyNet(), QuantConfig(), fuse_pairs=[("conv_a", "bn_a")])
    assert isinstance(model.conv_a, QuantConvBn2d) and isinstance(model.bn_a, FoldedBatchNorm2d)
    assert isinstance(model.conv_b, QuantConv2d) and isinstance(model.bn_b, nn.BatchNorm2d)


def test_bad_explicit_pair_is_rejected():
    with pytest.raises(ValueError, match=r"\('conv_a', 'fc'\) is not a float Conv2d"):
        prepare_qat(AttributeNet(), QuantConfig(), fuse_pairs=[("conv_a", "fc")])


def test_excluded_layers_stay_float():
    model = prepare_qat(AttributeNet(), QuantConfig(exclude=("fc", "conv_b")))
    assert type(model.fc) is nn.Linear and type(model.conv_b) is nn.Conv2d
    assert type(model.bn_b) is nn.BatchNorm2d and isinstance(model.conv_a, QuantConvBn2d)


def test_nothing_to_quantize_is_an_error():
    with pytest.raises(ValueError, match=r"nothing to quantize.*exclude=\['\*'\]"):
        prepare_qat(small_cnn(), QuantConfig(exclude=("*",)))
    with pytest.raises(ValueError, match="nothing to quantize"):
        prepare_qat(nn.Sequential(nn.ReLU()), QuantConfig())


def test_a_pattern_naming_nothing_is_an_error_before_any_change():
    """A misspelt name in ``exclude`` or ``layer_bits`` would leave the layer it meant
    quantized, or at the model-wide width, without a word."""
    cases = [
        (QuantConfig(exclude=["12"]), r"exclude has the pattern '12' matching no module"),
        (QuantConfig(exclude=["0", "fc*"]), r"exclude has the pattern 'fc\*' matching"),
        (QuantConfig(layer_bits={"10": 8}), r"layer_bits has the pattern '10' matching none"),
        # a pattern naming only an excluded layer sets nothing either
        (QuantConfig(exclude=["9"], layer_bits={"9": 8}), r"'9' matching none of the layers"),
        (QuantConfig(layer_bits={"@first": 8, "conv*": 8, "x": 4}), r"patterns 'conv\*', 'x'"),
    ]
    for config, message in cases:
        model = small_cnn()
        with pytest.raises(ValueError, match=message):
            prepare_qat(model, config)
        assert type(model[0]) is nn.Conv2d  # refused before converting anything
    model = prepare_qat(small_cnn(), QuantConfig(exclude=["9"], layer_bits={"?": 4, "@last": 8}))
    assert type(model[9]) is nn.Linear and model[3].weight_quantizer.quant_max == 7


def test_first_layer_input_float_unless_asked():
    model = prepare_qat(AttributeNet(), QuantConfig())
    assert model.conv_a.activation_quantizer.fake_quant_enabled is False
    assert model.conv_b.activation_quantizer.fake_quant_enabled is True
    model = prepare_qat(AttributeNet(), QuantConfig(quantize_first_input=True))
    assert model.conv_a.activation_quantizer.fake_quant_enabled is True


def test_quantizers_are_named_after_their_layer():
    model = prepare_qat(small_cnn(), QuantConfig())
    names = {q.observer.name for _, q in quantizers(model)}
    assert "9.weight_quantizer" in names and "0.activation_quantizer" in names


def test_parameters_are_the_same_objects_and_the_optimizer_carries_on():
    model = small_cnn()
    params = {id(p) for p in model.parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, target = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), target).backward()
    optimizer.step()
    prepare_qat(model, QuantConfig())
    assert {id(p) for p in model.parameters()} == params
    assert all(id(p) in params for p in optimizer.state)
    before = model[0].weight.detach().clone()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), target).backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)  # the old optimizer updates the QAT model


def test_state_dict_round_trip_of_a_converted_model():
    config = QuantConfig(symmetric=False, weight_bits=4)
    a = prepare_qat(small_cnn(), config)
    for _ in range(3):
        a(torch.randn(4, 3, 8, 8))
    a[0].freeze_bn()
    a[6].activation_quantizer.enable_observer(False)
    b = prepare_qat(small_cnn(), config)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(a(x), b(x))
    assert b[0].bn_frozen and not b[3].bn_frozen
    assert b[6].activation_quantizer.observer_enabled is False
    assert torch.equal(a[6].activation_quantizer.scale, b[6].activation_quantizer.scale)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_convert_and_train(name):
    model = getattr(torchvision.models, name)(num_classes=10)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    params = {id(p) for p in model.parameters()}
    prepare_qat(model, QuantConfig())
    unfolded = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not n.endswith(".bn")
    ]
    assert unfolded == []
    assert (
        sum(isinstance(m, QuantConvBn2d) for m in model.modules()) == n_conv
    )  # every conv has a BN
    assert {id(p) for p in model.parameters()} == params
    y = model(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class SharedOutputNet(nn.Module):
    """The conv output is read by the BN and by a skip connection: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_whose_output_is_also_read_elsewhere_is_not_folded():
    model = prepare_qat(SharedOutputNet(), QuantConfig())
    assert type(model.conv) is QuantConv2d and type(model.bn) is nn.BatchNorm2d


def test_parameter_order_and_batchnorm_keys_survive_conversion():
    """AttributeNet registers conv_b before bn_a: an optimizer built after conversion (as
    on resume) must index its state like one built before."""
    model = AttributeNet()
    names = [n for n, _ in model.named_parameters()]
    float_keys = set(model.state_dict())
    prepare_qat(model, QuantConfig())
    assert [n for n, _ in model.named_parameters()] == names
    assert float_keys <= set(model.state_dict())
    assert {"bn_a.running_mean", "bn_b.num_batches_tracked"} <= float_keys


def test_float_checkpoint_loads_into_converted_model_leaving_only_quantizer_keys():
    float_model = small_cnn()
    qat_model = prepare_qat(small_cnn(), QuantConfig())
    missing, unexpected = qat_model.load_state_dict(float_model.state_dict(), strict=False)
    assert unexpected == []
    assert all("quantizer" in k or k.endswith("_extra_state") for k in missing)
    assert torch.equal(qat_model[1].running_var, float_model[1].running_var)


def test_sync_batchnorm_is_folded_and_conversion_to_sync_leaves_folded_layers_alone():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(small_cnn())
    prepare_qat(model, QuantConfig())
    assert isinstance(model[0], QuantConvBn2d) and model[1].sync
    again = prepare_qat(small_cnn(), QuantConfig())
    nn.SyncBatchNorm.convert_sync_batchnorm(again)
    assert type(again[1]) is FoldedBatchNorm2d and again[0].bn is again[1]


def test_deepcopy_keeps_the_folded_layer_pointing_at_its_own_batchnorm():
    import copy

    model = prepare_qat(small_cnn(), QuantConfig())
    clone = copy.deepcopy(model)
    assert clone[0].bn is clone[1] and clone[1] is not model[1]


class UntraceableWrapper(nn.Module):
    """Like a LightningModule whose forward does not trace, around a model that does."""

    def __init__(self):
        super().__init__()
        self.model = AttributeNet()
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.mean() > 100:
            return x
        return self.model(x)


def test_children_of_an_untraceable_module_are_traced_on_their_own(recwarn):
    model = prepare_qat(UntraceableWrapper(), QuantConfig())
    assert isinstance(model.model.conv_a, QuantConvBn2d)
    assert isinstance(model.model.conv_b, QuantConvBn2d)
    assert isinstance(model.head[0], QuantConvBn2d)
    assert not [w for w in recwarn if "stay unfolded" in str(w.message)]  # every pair folds
    # the residual add inside the traceable child is placed as in the child on its own
    assert hasattr(model.model.bn_b, "output_quantizer")
    (unseen,) = [str(w.message) for w in recwarn if "could not trace" in str(w.message)]
    assert "UntraceableWrapper" in unseen and "children were placed one by one" in unseen
