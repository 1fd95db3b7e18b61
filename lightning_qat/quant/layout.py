"""Tensors read in the order they lie in memory."""

from __future__ import annotations

import torch


def flat_in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-d view in the order they lie in memory: no copy for any
    dense layout (contiguous, channels_last, any permutation of them), a copy only where
    ``t`` has gaps.

    For reductions whose result does not depend on the order of the elements (min, max,
    sums paired element by element): ``torch.aminmax`` of a channels_last activation
    otherwise copies it to contiguous first, a full extra read and write of every
    activation at every observer, every step."""
    if torch.compiler.is_compiling():
        # inductor indexes the tensor where it lies anyway (and strides may be symbolic)
        return t.reshape(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).reshape(-1)
