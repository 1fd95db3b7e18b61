"""ReLUs whose only reader is a per-tensor quantizer leave their gradient mask to it
(`ReLUBeforeQuantizer`): same numerics bit for bit, fewer tensors kept for the backward."""

import copy
import pickle
from unittest import mock

import pytest
import torch
from torch import nn
from training_steps import MODELS, SMALL_NIN, train

import lightning_qat.prepare as prepare_module
from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.app.models import NIN, resnet20
from lightning_qat.nn import ReLUBeforeQuantizer
from lightning_qat.quant import FakeQuantize

CONFIGS = [
    QuantConfig(),
    QuantConfig(symmetric=False, bn_fold=False),
    # learned steps and LSQ+ offsets: their gradients read the in-range mask alone
    QuantConfig(weight_bits=4, activation_bits=4, activation_symmetric=False, learn_scale=True),
]


def prepare_without_joining(model, config):
    """`prepare_qat` as before the ReLUs were joined to their quantizers."""
    with mock.patch.object(prepare_module, "_join_relus_to_quantizers", lambda *args: None):
        return prepare_qat(model, config)


def joined(model):
    return [name for name, m in model.named_modules() if isinstance(m, ReLUBeforeQuantizer)]


@pytest.mark.parametrize("config", CONFIGS, ids=["sym-folded", "asym-unfolded", "lsq-w4a4"])
@pytest.mark.parametrize("name", list(MODELS))
def test_joined_relus_train_bit_for_bit_as_plain_ones(name, config):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    base = make()
    inputs = [torch.randn(shape) for _ in range(3)]
    ours = prepare_qat(copy.deepcopy(base), config)
    plain = prepare_without_joining(copy.deepcopy(base), config)
    assert joined(ours) and not joined(plain)
    for a, b in zip(train(ours, inputs), train(plain, inputs), strict=True):
        assert torch.equal(a, b)


def test_which_relus_are_joined():
    # NIN: the ReLUs before a max pool (which keeps its input) and the last one (read by
    # the average pool, which no quantizer follows) stay plain ReLUs
    nin = prepare_qat(NIN(widths=SMALL_NIN), QuantConfig())
    assert joined(nin) == ["2", "5", "12", "15", "22", "25"]
    for name in joined(nin):
        reader = nin[int(name) + 1].activation_quantizer
        assert nin.get_submodule(name).reader is reader and reader.input_after_relu
    # ResNet-20: every ReLU, those of the residual path through their own output quantizer
    resnet = prepare_qat(resnet20(), QuantConfig())
    assert len(joined(resnet)) == 19
    relu2 = resnet.layers[0].relu2
    assert relu2.reader is relu2.output_quantizer
    # learned steps join the same ReLUs (their backward zeroes the gradient in place)
    learned = prepare_qat(NIN(widths=SMALL_NIN), QuantConfig(learn_scale=True))
    assert joined(learned) == joined(nin)


class ReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.conv1(x))
        return self.conv2(y) * y


class CalledTwice(ReadTwice):
    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_a_relu_read_by_several_ops_joins_its_own_output_quantizer():
    """Several ops read the ReLU's value: it is quantized once, by a quantizer on the
    ReLU's output (which the product then reads), and that quantizer applies the mask."""
    torch.manual_seed(0)
    base = ReadTwice()
    inputs = [torch.randn(2, 3, 5, 5) for _ in range(3)]
    config = QuantConfig(quantize_first_input=True)
    ours = prepare_qat(copy.deepcopy(base), config)
    assert joined(ours) == ["relu"] and ours.relu.reader is ours.relu.output_quantizer
    plain = prepare_without_joining(copy.deepcopy(base), config)
    for a, b in zip(train(ours, inputs), train(plain, inputs), strict=True):
        assert torch.equal(a, b)


def test_a_relu_called_twice_stays_plain():
    prepared = prepare_qat(CalledTwice(), QuantConfig(quantize_first_input=True))
    assert type(prepared.relu) is nn.ReLU and not joined(prepared)


def test_a_quantizer_that_stops_fake_quantizing_leaves_the_relu_its_mask():
    torch.manual_seed(0)
    base = NIN(widths=SMALL_NIN)
    inputs = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    ours = prepare_qat(copy.deepcopy(base), QuantConfig())
    plain = prepare_without_joining(copy.deepcopy(base), QuantConfig())
    for model in (ours, plain):
        for name in joined(ours):
            model[int(name) + 1].activation_quantizer.enable_fake_quant(False)
    for a, b in zip(train(ours, inputs), train(plain, inputs), strict=True):
        assert torch.equal(a, b)


def test_input_gradients_in_eval_are_those_of_plain_relus():
    torch.manual_seed(0)
    base = NIN(widths=SMALL_NIN)
    x = torch.randn(4, 3, 16, 16)
    grads = []
    for model in (
        prepare_qat(copy.deepcopy(base), QuantConfig()),
        prepare_without_joining(copy.deepcopy(base), QuantConfig()),
    ):
        model(x)  # observe once
        model.eval()
        x_in = x.clone().requires_grad_()
        model(x_in).sum().backward()
        grads.append(x_in.grad)
    assert torch.equal(*grads)


def test_fewer_tensors_are_kept_for_the_backward():
    """The bytes autograd saves in a training step (unique storages): a joined ReLU keeps
    nothing where a plain one keeps its float output."""

    def saved_bytes(model, x):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        return sum(storages.values())

    torch.manual_seed(0)
    base = NIN(widths=SMALL_NIN)
    x = torch.randn(8, 3, 32, 32)
    ours = saved_bytes(prepare_qat(copy.deepcopy(base), QuantConfig()), x)
    plain = saved_bytes(prepare_without_joining(copy.deepcopy(base), QuantConfig()), x)
    float_ = saved_bytes(copy.deepcopy(base), x)
    # the six joined ReLUs' float outputs, less their 1-byte masks ANDed into the
    # quantizers' own: 16, 12 channels at 32x32, 16, 16 at 16x16 and 16, 16 at 8x8
    relu_outputs = 8 * 4 * (16 * 32 * 32 + 12 * 32 * 32 + 2 * 16 * 16 * 16 + 2 * 16 * 8 * 8)
    assert abs((plain - ours) - relu_outputs) < 1024  # (scalars of a few bytes aside)
    assert ours < 1.15 * float_ < plain


def test_copies_and_pickles_keep_the_reader_their_own():
    model = prepare_qat(NIN(widths=SMALL_NIN), QuantConfig())
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        relu = copied.get_submodule("2")
        assert relu.reader is copied[3].activation_quantizer
        assert relu.reader is not model[3].activation_quantizer
    assert "reader" not in str(model.state_dict().keys())


def test_convert_refuses_what_it_cannot_join():
    from lightning_qat.quant import FakeQuantize

    quantizer = FakeQuantize.for_activations(QuantConfig())
    with pytest.raises(TypeError, match=r"nn\.ReLU"):
        ReLUBeforeQuantizer.convert(nn.ReLU6(), quantizer)
    per_channel = FakeQuantize.for_weights(QuantConfig(learn_scale=True), num_channels=4)
    with pytest.raises(TypeError, match="per-tensor FakeQuantize"):
        ReLUBeforeQuantizer.convert(nn.ReLU(), per_channel)


def test_the_quantizer_writes_over_the_relu_output_it_alone_reads():
    """In a training step each joined ReLU's output is overwritten by its quantized value
    (one activation-sized allocation less each); plain ReLUs' outputs are not."""
    from lightning_qat.quant import fake_quantize as fake_quantize_module

    calls = []
    original = fake_quantize_module.fake_quantize_compiled

    def recording(x, *args):
        result = original(x, *args)
        calls.append(result is not None and result[0] is x)
        return result

    torch.manual_seed(0)
    base = NIN(widths=SMALL_NIN)
    x = torch.randn(4, 3, 16, 16)
    with mock.patch.object(fake_quantize_module, "fake_quantize_compiled", recording):
        ours = prepare_qat(copy.deepcopy(base), QuantConfig())
        ours(x).sum().backward()
        assert calls.count(True) == len(joined(ours)) == 6
        calls.clear()
        prepare_without_joining(copy.deepcopy(base), QuantConfig())(x).sum().backward()
        assert calls and not any(calls)


def test_a_relu_output_kept_elsewhere_is_not_overwritten_silently():
    """Were a joined ReLU's output also saved by another op (a hook's doing, say), writing
    over it would corrupt that op's gradient: autograd's version check refuses instead."""
    from lightning_qat.nn.relu import _ReLUMaskDeferred
    from lightning_qat.quant import FakeQuantize

    quantizer = FakeQuantize.for_activations(QuantConfig(symmetric=False))
    quantizer.input_after_relu = True
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = _ReLUMaskDeferred.apply(x * 1.0, False)
    weight = torch.randn(2, 4, 8, 8, requires_grad=True)
    other_reader = (y * weight).sum()  # saves y for weight's gradient
    out = quantizer(y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + other_reader).backward()


def test_learned_steps_train_bit_for_bit_through_the_freeze():
    """LSQ with joined ReLUs, learning and then frozen (the callback's
    ``freeze_observer_epoch``: the frozen grid runs through the observer-based pass,
    written over the ReLU's output): every output, gradient and Parameter as with plain
    ReLUs."""
    torch.manual_seed(0)
    base = resnet20()
    config = CONFIGS[2]
    inputs = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    ours = prepare_qat(copy.deepcopy(base), config)
    plain = prepare_without_joining(copy.deepcopy(base), config)
    assert len(joined(ours)) == 19 and not joined(plain)
    seen = []
    for model in (ours, plain):
        learning = train(model, inputs[:2])
        for module in model.modules():
            if isinstance(module, FakeQuantize):
                module.enable_observer(False)
        seen.append(learning + train(model, inputs[2:]))
    for a, b in zip(*seen, strict=True):
        assert torch.equal(a, b)
