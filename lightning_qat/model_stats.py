"""Model cost: multiply-accumulates and storage, float and quantized."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_qat.nn import QUANTIZED_LAYERS, FoldedBatchNorm2d


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (batch 1), counted by
    torch's ``FlopCounterMode`` (which counts a multiply-add as 2 FLOPs)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops() // 2


def model_size_bytes(model: nn.Module, quantized: bool = False) -> int:
    """Bytes to store the parameters: float32 everywhere, or, with ``quantized``, what
    the integer model stores: ``bits/8`` a weight of each quantized layer, an int32 bias
    (the folded BN becomes that bias) and a float32 scale and int32 zero point per
    channel; other parameters stay float32 and folded BatchNorms cost nothing more."""
    if not quantized:
        return sum(p.numel() * 4 for p in model.parameters())
    total = 0
    counted: set[int] = set()
    for module in model.modules():
        if isinstance(module, QUANTIZED_LAYERS):
            quantizer = module.weight_quantizer
            total += (module.weight.numel() * quantizer.bits + 7) // 8
            out_channels = module.weight.shape[0]
            has_bias = module.bias is not None or hasattr(module, "bn")
            total += out_channels * 4 * has_bias + quantizer.scale.numel() * 8
            counted.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, FoldedBatchNorm2d):
            counted.update(id(p) for p in module.parameters(recurse=False))
    total += sum(p.numel() * 4 for p in model.parameters() if id(p) not in counted)
    return total
