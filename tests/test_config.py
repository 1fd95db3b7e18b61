import pytest

from lightning_qat import QuantConfig


def test_defaults_are_w8a8_symmetric_per_channel_folded():
    c = QuantConfig()
    assert (c.weight_bits, c.activation_bits, c.symmetric, c.per_channel, c.bn_fold) == (
        8,
        8,
        True,
        True,
        True,
    )
    assert c.observer == "ema" and c.ema_momentum == 0.01


@pytest.mark.parametrize("field", ["weight_bits", "activation_bits", "residual_bits"])
@pytest.mark.parametrize("bits", [1, 9, 16, 0, -8, 4.0, True, "8"])
def test_bits_outside_2_to_8_are_rejected_naming_the_field(field, bits):
    with pytest.raises(ValueError, match=rf"{field}.*from 2 to 8"):
        QuantConfig(**{field: bits})


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bit_width_2_to_8_is_accepted(bits):
    assert QuantConfig(weight_bits=bits, activation_bits=bits).weight_bits == bits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"observer": "histogram"}, r"observer='histogram' is not one of ema, minmax"),
        ({"ema_momentum": 0.0}, r"ema_momentum=0.0 must be a number in \(0, 1\]"),
        ({"ema_momentum": 1.5}, r"ema_momentum"),
        ({"symmetric": "yes"}, r"symmetric='yes' must be True or False"),
        ({"per_channel": 1}, r"per_channel"),
        ({"weight_narrow_range": "false"}, r"weight_narrow_range='false' must be True or False"),
        ({"high_bits_damping": 1}, r"high_bits_damping=1 must be True \(every step above 4"),
        ({"high_bits_damping": "all"}, r"high_bits_damping='all' must be True"),
        ({"exclude": "fc"}, r"exclude='fc' must be a list"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_to_dict_round_trips():
    c = QuantConfig(weight_bits=4, symmetric=False, exclude=["fc", "features.0"])
    assert QuantConfig(**c.to_dict()) == c
