"""Post-training quantization (PTQ): set the activation ranges of a prepared model from
a few batches, without training."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_qat.prepare import activation_quantizers, quantized_layers
from lightning_qat.quant import FakeQuantize
from lightning_qat.quant.layout import flat_in_memory_order
from lightning_qat.quant.range_search import mse_range

METHODS = ("minmax", "ema", "percentile", "kl", "mse")
HISTOGRAM_BINS = 2048
#: Elements of each activation kept (a strided sample of every batch) for the ``mse``
#: search, which costs a hundred fake-quant passes over them.
MSE_SAMPLE = 1 << 18


def batch_input(batch: Any) -> Any:
    """The model input of a batch: its first element for an (input, target) pair."""
    return batch[0] if isinstance(batch, list | tuple) else batch


class _RangeCollector:
    """Gathers what a method needs of one activation over the calibration batches."""

    def __init__(self, method: str, momentum: float, sample_per_batch: int = MSE_SAMPLE):
        self.method = method
        self.sample_per_batch = sample_per_batch
        self.samples: list[torch.Tensor] = []  # for mse
        self.momentum = momentum
        self.min = self.max = None  # running (minmax) or EMA (ema) range
        self.histogram: torch.Tensor | None = None
        self.zeros = 0  # exact zeros among the histogram's values (ReLU outputs)
        self.abs_max: float = 0.0

    def observe_range(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(flat_in_memory_order(x.detach().float()))
        lo, hi = float(lo), float(hi)
        if self.min is None:
            self.min, self.max = lo, hi
        elif self.method == "ema":
            self.min += self.momentum * (lo - self.min)
            self.max += self.momentum * (hi - self.max)
        else:
            self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.abs_max = max(abs(self.min), abs(self.max), self.abs_max)
        if self.method == "mse":
            values = x.detach().float().flatten()
            self.samples.append(values[:: math.ceil(values.numel() / self.sample_per_batch)])

    def observe_histogram(self, x: torch.Tensor) -> None:
        """Histogram of |x| over [0, abs_max] (the first pass found abs_max)."""
        values = x.detach().float().abs().flatten()
        hist = torch.histc(values, bins=HISTOGRAM_BINS, min=0.0, max=max(self.abs_max, 1e-12))
        self.histogram = hist if self.histogram is None else self.histogram + hist
        self.zeros += int((values == 0).sum())


def percentile_threshold(histogram: torch.Tensor, bin_width: float, percentile: float) -> float:
    """The |x| below which ``percentile`` percent of the values lie (upper bin edge)."""
    cdf = torch.cumsum(histogram.double(), 0) / histogram.sum()
    index = int(torch.searchsorted(cdf, torch.tensor(percentile / 100, dtype=torch.float64)))
    return (min(index, len(histogram) - 1) + 1) * bin_width


def kl_threshold(histogram: torch.Tensor, bin_width: float, levels: int) -> float:
    """TensorRT's entropy calibration (Migacz 2017, "8-bit inference with TensorRT"): the
    clipping threshold of |x| whose quantized distribution (``levels`` bins) is closest,
    in KL divergence, to the histogram clipped there (outliers added to the last bin)."""
    hist = histogram.double().numpy()
    n = len(hist)
    if hist.sum() == 0 or n <= levels:
        return n * bin_width
    best_kl, best_i = np.inf, n
    for i in range(levels, n + 1):
        reference = hist[:i].copy()
        reference[-1] += hist[i:].sum()
        nonzero = hist[:i] != 0
        # merge the i bins into `levels` bins, then spread each back over its non-empty bins
        starts = np.linspace(0, i, levels + 1).astype(int)[:-1]
        lengths = np.diff(np.append(starts, i))
        sums = np.add.reduceat(hist[:i], starts)
        counts = np.add.reduceat(nonzero.astype(float), starts)
        per_bin = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        candidate = np.where(nonzero, np.repeat(per_bin, lengths), 0.0)
        p = reference / reference.sum()
        q = candidate / max(candidate.sum(), 1e-12)
        mask = p > 0
        with np.errstate(divide="ignore"):
            kl = np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * bin_width


@torch.no_grad()
def calibrate(
    model: nn.Module,
    dataloader: Iterable,
    method: str = "minmax",
    num_batches: int = 16,
    *,
    percentile: float = 99.99,
    momentum: float = 0.1,
    model_input: Callable[[Any], Any] = batch_input,
) -> nn.Module:
    """Post-training quantization: set the activation scales and zero points of a model
    already converted with `prepare_qat`, from ``num_batches`` batches, without training.

    The batches run in float (fake quantization off, BN on running statistics), as
    TensorRT calibrates; each quantized layer's input range is then

    - ``minmax``: the min and max over all batches;
    - ``ema``: an exponential moving average of each batch's min and max (``momentum``;
      Jacob et al. 2018, section 3.1);
    - ``percentile``: ``percentile`` of |x| on a histogram, clipped to the observed range;
    - ``kl``: TensorRT's entropy calibration on a 2048-bin histogram of |x|;
    - ``mse``: the range ``[α min, α max]`` whose quantization of a sample of the batches
      has the least squared error (`lightning_qat.quant.range_search.mse_range`; Banner
      et al. 2019, section 3), and the same search for the weight ranges.

    Weight scales come from the weights (per channel as configured): their full range,
    or with ``mse`` the least-error range (at 4 bits and below it matters most there).
    Afterwards fake quantization is on and every observer is frozen. Returns ``model``, in
    eval mode.
    """
    if method not in METHODS:
        raise ValueError(f"calibrate(method={method!r}): use one of {', '.join(METHODS)}")
    if num_batches < 1:
        raise ValueError(f"calibrate(num_batches={num_batches}) must be at least 1")
    layers = dict(quantized_layers(model))
    if not layers:
        raise ValueError("calibrate needs a model converted with prepare_qat(model, config)")
    model.eval()
    quantizers: dict[str, FakeQuantize] = dict(activation_quantizers(model))
    fake_quant = {n: q.fake_quant_enabled for n, q in quantizers.items()}
    per_batch = max(MSE_SAMPLE // num_batches, 1)
    collectors = {n: _RangeCollector(method, momentum, per_batch) for n in quantizers}
    for q in [*quantizers.values(), *(layer.weight_quantizer for layer in layers.values())]:
        q.enable_fake_quant(False).enable_observer(False)  # a float forward pass

    passes = ["observe_range"] + (["observe_histogram"] if method in ("percentile", "kl") else [])
    device = next(model.parameters()).device
    for observe in passes:
        hooks = [
            q.register_forward_pre_hook(
                lambda _, args, c=collectors[n], f=observe: getattr(c, f)(args[0])
            )
            for n, q in quantizers.items()
        ]
        try:
            for index, batch in enumerate(dataloader):
                if index >= num_batches:
                    break
                model(model_input(batch).to(device))
        finally:
            for hook in hooks:
                hook.remove()

    unseen = [name for name, c in collectors.items() if c.min is None]
    if unseen and len(unseen) == len(collectors):
        raise ValueError("calibrate: no quantizer saw data (an empty dataloader?)")
    if unseen:
        raise ValueError(
            f"calibrate: {', '.join(unseen)} saw no data while the others did: the "
            "model's forward never calls them (a module whose weight is read directly, "
            "or a fused path that bypasses it)"
        )
    for name, quantizer in quantizers.items():
        c = collectors[name]
        low, high = c.min, c.max
        if method in ("percentile", "kl"):
            width = max(c.abs_max, 1e-12) / HISTOGRAM_BINS
            if method == "percentile":
                threshold = percentile_threshold(c.histogram, width, percentile)
            else:
                levels = (
                    quantizer.quant_max
                    if quantizer.symmetric or low < 0
                    else (quantizer.quant_max - quantizer.quant_min)
                )
                # Exact zeros (half of a ReLU output, often more) are exact under any
                # threshold; left in the first bin they dominate the distributions and
                # pull the threshold far down (NIN: 41 points lost). KL of the rest.
                histogram = c.histogram.clone()
                histogram[0] -= c.zeros
                threshold = kl_threshold(histogram, width, levels)
            low, high = max(low, -threshold), min(high, threshold)
        elif method == "mse":
            low, high = mse_range(
                torch.cat(c.samples), quantizer.quant_min, quantizer.quant_max, quantizer.symmetric
            )
        observer = quantizer.observer
        observer.min_val.fill_(low)
        observer.max_val.fill_(high)
        quantizer.update_qparams()
        quantizer.enable_fake_quant(fake_quant[name])
    for layer in layers.values():
        weight = layer.weight_quantizer
        weight.enable_observer(True).enable_fake_quant(True)
        weight(layer.weight_to_quantize())  # scales from the weights (observes in eval)
        weight.enable_observer(False)
        if method == "mse":
            low, high = mse_range(
                layer.weight_to_quantize(),
                weight.quant_min,
                weight.quant_max,
                weight.symmetric,
                weight.ch_axis if weight.per_channel else None,
            )
            weight.observer.min_val.copy_(low)
            weight.observer.max_val.copy_(high)
            weight.update_qparams()
    return model
