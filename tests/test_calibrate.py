"""PTQ calibration: each method's range, the KL threshold, accuracy on real data."""

import pytest
import torch
from torch import nn

from lightning_qat import QuantConfig, calibrate, prepare_qat, quantized_layers
from lightning_qat.app.data import DigitsData
from lightning_qat.app.models import LeNet
from lightning_qat.calibrate import HISTOGRAM_BINS, kl_threshold, percentile_threshold


def probe(batches):
    """A prepared Linear whose input range is what calibration sets."""
    model = prepare_qat(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2)), QuantConfig())
    loader = [(b, None) for b in batches]
    return model, loader


def first_range(model):
    q = dict(quantized_layers(model))["0"].activation_quantizer
    return q.observer.min_val.item(), q.observer.max_val.item()


def test_minmax_takes_the_range_over_all_batches():
    batches = [
        torch.tensor([[-1.0, 0, 0, 2]]),
        torch.tensor([[0.5, 0, 0, 3]]),
        torch.tensor([[-4.0, 0, 0, 1]]),
    ]
    model, loader = probe(batches)
    calibrate(model, loader, "minmax", num_batches=2)  # the third batch is not used
    assert first_range(model) == (-1.0, 3.0)


def test_ema_averages_batch_ranges():
    batches = [torch.tensor([[-1.0, 0, 0, 2]]), torch.tensor([[-3.0, 0, 0, 4]])]
    model, loader = probe(batches)
    calibrate(model, loader, "ema", num_batches=2, momentum=0.5)
    assert first_range(model) == (-2.0, 3.0)


def test_percentile_clips_outliers():
    torch.manual_seed(0)
    data = torch.randn(100, 4)
    data[0, 0] = 1000.0
    model, loader = probe([data])
    calibrate(model, loader, "percentile", num_batches=1, percentile=99.0)
    low, high = first_range(model)
    assert 1.5 < high < 10 and low == data.min().item()


def test_percentile_threshold_on_a_known_histogram():
    histogram = torch.zeros(100)
    histogram[:99] = 1
    histogram[99] = 1
    assert percentile_threshold(histogram, 0.1, 50.0) == pytest.approx(5.0)


def test_kl_keeps_a_uniform_range_and_clips_a_long_tail():
    uniform = torch.ones(HISTOGRAM_BINS)
    assert kl_threshold(uniform, 1.0, 127) >= 0.9 * HISTOGRAM_BINS
    # a Gaussian bulk and 20 outliers at 100 sigma: clipping them beats resolution loss
    values = torch.cat([torch.randn(200_000).abs(), torch.full((20,), 100.0)])
    histogram = torch.histc(values, HISTOGRAM_BINS, 0, 100.0)
    threshold = kl_threshold(histogram, 100.0 / HISTOGRAM_BINS, 127)
    assert 3.0 < threshold < 20.0


def test_kl_is_not_pulled_down_by_the_zeros_of_a_relu():
    """Half of a ReLU output is exactly 0, exact under any threshold: the threshold must
    be the one of the non-zero values (it was 7x lower with the zeros in the first bin)."""
    torch.manual_seed(0)
    positive = torch.distributions.Exponential(1.0).sample((4, 20_000, 4))
    relu_like = torch.where(torch.rand(positive.shape) < 0.5, 0.0, positive)
    thresholds = []
    for batches in (positive, relu_like):
        model, loader = probe(list(batches))
        calibrate(model, loader, "kl", num_batches=4)
        thresholds.append(first_range(model)[1])
    assert thresholds[1] > 0.75 * thresholds[0]


def test_bad_arguments_are_named():
    model, loader = probe([torch.zeros(1, 4)])
    with pytest.raises(ValueError, match=r"method=.entropy.*minmax, ema, percentile, kl"):
        calibrate(model, loader, "entropy")
    with pytest.raises(ValueError, match="prepare_qat"):
        calibrate(nn.Linear(2, 2), loader)


@pytest.fixture(scope="module")
def trained_digits():
    torch.manual_seed(0)
    data = DigitsData(batch_size=64)
    data.setup()
    model = LeNet(image_size=8, widths=(16, 32, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(6):
        model.train()
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model, data


def accuracy(model, data):
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in data.test_dataloader())
    return hits / len(data.test_set)


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "kl"])
def test_ptq_on_real_data_stays_close_to_float(trained_digits, method):
    import copy

    float_model, data = trained_digits
    baseline = accuracy(float_model, data)
    model = prepare_qat(copy.deepcopy(float_model), QuantConfig())
    calibrate(model, data.train_dataloader(), method, num_batches=8)
    quantized = accuracy(model, data)
    assert baseline > 0.9
    assert quantized > baseline - 0.03, (method, baseline, quantized)
    layers = dict(quantized_layers(model))
    assert all(not q.activation_quantizer.observer_enabled for q in layers.values())
    assert layers["4"].activation_quantizer.fake_quant_enabled
