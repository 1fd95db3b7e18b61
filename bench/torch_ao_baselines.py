"""torch.ao eager-mode baselines of the benchmarks, for a Sequential NIN (Conv->BN->ReLU
triples): QAT preparation and post-training int8 conversion. Each returns None where torch
no longer ships torch.ao.quantization (deprecated upstream)."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def _conv_bn_relu_groups(model: nn.Sequential) -> list[list[str]]:
    return [
        [str(i), str(i + 1), str(i + 2)] for i, m in enumerate(model) if isinstance(m, nn.Conv2d)
    ]


def _torch_ao():
    try:
        from torch.ao import quantization
    except ImportError:
        return None
    return quantization


def torch_ao_qat(model: nn.Sequential) -> nn.Module | None:
    """torch.ao eager-mode QAT of a Sequential NIN (fused ConvBnReLU2d, fbgemm qconfig)."""
    ao = _torch_ao()
    if ao is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        model = ao.fuse_modules_qat(model.train(), _conv_bn_relu_groups(model))
        model.qconfig = ao.get_default_qat_qconfig("fbgemm")
        return ao.prepare_qat(model)


def torch_ao_int8(model: nn.Sequential, batches: list[torch.Tensor]) -> nn.Module | None:
    """torch.ao eager-mode post-training int8 conversion (x86 backend), calibrated on
    ``batches``."""
    ao = _torch_ao()
    if ao is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        torch.backends.quantized.engine = "x86"
        fused = ao.fuse_modules(model.eval(), _conv_bn_relu_groups(model))
        wrapped = nn.Sequential(ao.QuantStub(), fused, ao.DeQuantStub())
        wrapped.qconfig = ao.get_default_qconfig("x86")
        prepared = ao.prepare(wrapped)
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return ao.convert(prepared)


def torch_ao_int8_fx(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module | None:
    """torch.ao FX graph-mode post-training int8 conversion (x86 backend), calibrated on
    ``batches``: any traceable model, residual adds included."""
    ao = _torch_ao()
    if ao is None:
        return None
    try:
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        torch.backends.quantized.engine = "x86"
        mapping = ao.get_default_qconfig_mapping("x86")
        prepared = prepare_fx(model.eval(), mapping, (batches[0],))
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return convert_fx(prepared)
