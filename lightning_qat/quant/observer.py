"""Range observers: track the min/max that scales and zero points are computed from."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from lightning_qat.quant.layout import flat_in_memory_order


class MovingAverageMinMaxObserver(nn.Module):
    """Exponential moving average of each batch's min and max, per tensor or per channel.

    ``range <- range + momentum * (batch_range - range)``; the first batch initialises the
    range (Jacob et al. 2018, section 3.1: "exponential moving averages (EMA) with the
    smoothing parameter being close to 1"; momentum here is 1 minus that parameter, torch's
    default 0.01).

    A batch whose min or max is not finite (an overflow, a NaN in an activation) is left
    out of the range, and a warning naming the quantizer is given once; ``num_nonfinite``
    counts such batches.

    With ``sync`` set and a process group of several ranks (DDP), each batch's range is
    reduced over the ranks (min of mins, max of maxes) before it enters the average, so
    every rank holds the same range, scale and zero point at every step.

    Args:
        momentum: weight of the newest batch, in (0, 1].
        num_channels: ``None`` for one range per tensor, else the size of ``ch_axis``.
        ch_axis: the channel axis for per-channel ranges.
    """

    def __init__(self, momentum: float = 0.01, num_channels: int | None = None, ch_axis: int = 0):
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum={momentum!r} must be in (0, 1]")
        self.momentum = momentum
        self.ch_axis = ch_axis
        shape = () if num_channels is None else (num_channels,)
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))
        self.register_buffer("num_nonfinite", torch.zeros((), dtype=torch.int64))
        self.name = ""  # set by prepare_qat to the owning layer's name, for warnings
        self.sync = False  # set by the QAT callback under DDP
        self._warned = False

    @property
    def per_channel(self) -> bool:
        return self.min_val.dim() == 1

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of ``x``, over all elements or per channel."""
        if not self.per_channel:
            return torch.aminmax(flat_in_memory_order(x))
        return torch.aminmax(x.movedim(self.ch_axis, 0).flatten(1), dim=1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        batch_min, batch_max = self.batch_range(x.detach())
        batch_min, batch_max = batch_min.float(), batch_max.float()
        if (
            self.sync
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            batch_min, batch_max = _reduce_over_ranks(batch_min, batch_max)
        finite = torch.isfinite(batch_min) & torch.isfinite(batch_max)
        seen = torch.isfinite(self.min_val)
        # lerp with weight 1 returns the batch value bit-exactly, so momentum 1 is plain min/max.
        new_min = torch.where(seen, torch.lerp(self.min_val, batch_min, self.momentum), batch_min)
        new_max = torch.where(seen, torch.lerp(self.max_val, batch_max, self.momentum), batch_max)
        # torch.where instead of a Python branch: no host sync on an accelerator.
        self.min_val.copy_(torch.where(finite, new_min, self.min_val))
        self.max_val.copy_(torch.where(finite, new_max, self.max_val))
        all_finite = finite.all()
        self.num_nonfinite.add_((~all_finite).long())
        # Warn at once on the CPU, where checking is free; elsewhere warn_if_nonfinite()
        # reads the counter when the caller chooses (the callback, once an epoch).
        # (not under torch.compile: reading the flag would break the graph)
        if (
            x.device.type == "cpu"
            and not self._warned
            and not torch.compiler.is_compiling()
            and not bool(all_finite)
        ):
            self.warn_if_nonfinite()

    def warn_if_nonfinite(self) -> None:
        """Warn once if any observed batch held NaN or Inf."""
        if self._warned or int(self.num_nonfinite) == 0:
            return
        self._warned = True
        warnings.warn(
            f"quantizer {self.name or '<unnamed>'}: {int(self.num_nonfinite)} batch(es) held "
            "NaN or Inf; they were left out of the quantization range",
            RuntimeWarning,
            stacklevel=2,
        )

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, per_channel={self.per_channel}"


def _reduce_over_ranks(
    batch_min: torch.Tensor, batch_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min of the ranks' minima and max of their maxima, in one all-reduce. A rank's
    non-finite bound is replaced by the identity of the reduction (+inf for the min,
    -inf for the max), so it drops out unless every rank's bound is non-finite."""
    inf = torch.full_like(batch_min, float("inf"))
    packed = torch.stack(
        [
            -torch.where(torch.isfinite(batch_min), batch_min, inf),
            torch.where(torch.isfinite(batch_max), batch_max, -inf),
        ]
    )
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return -packed[0], packed[1]


class MinMaxObserver(MovingAverageMinMaxObserver):
    """Min and max of the current tensor only (momentum 1): the weights' observer.

    The whitepaper (section 3.1) takes the weight range from the current weights at each
    step, as the weights change with every optimizer step.
    """

    def __init__(self, num_channels: int | None = None, ch_axis: int = 0):
        super().__init__(momentum=1.0, num_channels=num_channels, ch_axis=ch_axis)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}"
