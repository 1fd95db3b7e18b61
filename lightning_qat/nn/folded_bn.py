"""`FoldedBatchNorm2d`: what stands where a BatchNorm stood once it is folded."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_qat.nn.pruning import adopt_tensor


class FoldedBatchNorm2d(nn.Module):
    """A BatchNorm (2-d, or 1-d after a Conv1d) whose work moved into the preceding
    `QuantConvBn2d` / `QuantConvBn1d`: passes its input through, and holds the
    BatchNorm's very Parameters and statistics under the same names.

    Keeping them here rather than inside the convolution keeps the model's ``state_dict``
    keys and, above all, the order of ``model.parameters()`` unchanged by ``prepare_qat``:
    an optimizer built before conversion and one built after it (as on resuming from a
    checkpoint) index their state the same way.

    `normalize` is the training-mode BatchNorm that `QuantConvBn2d` applies to its
    batch-corrected output. With ``sync`` on and a process group of several ranks, the
    batch statistics are all-reduced over the ranks (torch's SyncBatchNorm only runs on
    GPUs; this runs on any device, gloo included).

    Not a ``_BatchNorm`` subclass on purpose: ``SyncBatchNorm.convert_sync_batchnorm``
    (Lightning's ``sync_batchnorm=True``) must not turn it back into a normalising layer.
    """

    def __init__(self, bn: _BatchNorm, sync: bool | None = None):
        super().__init__()
        if not bn.track_running_stats:
            raise ValueError("folding needs running statistics: track_running_stats=True")
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = bn.momentum
        self.affine = bn.affine
        adopt_tensor(self, bn, "weight")  # a pruned BatchNorm stays pruned
        adopt_tensor(self, bn, "bias")
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.sync = isinstance(bn, nn.SyncBatchNorm) if sync is None else sync
        self.process_group = getattr(bn, "process_group", None)
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _momentum(self) -> float:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _world_size(self) -> int:
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``γ (z - μ_B) / sqrt(σ²_B + eps) + β`` with batch statistics; updates the running
        ones (unbiased variance, as nn.BatchNorm2d)."""
        momentum = self._momentum()
        if self._world_size() == 1:
            return F.batch_norm(
                z,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                True,
                momentum,
                self.eps,
            )
        return self._synced_normalize(z, momentum)

    def _synced_normalize(self, z: torch.Tensor, momentum: float) -> torch.Tensor:
        """Batch statistics over all ranks: all-reduce of per-channel count, sum and sum of
        squares. ``torch.distributed.nn.all_reduce`` is differentiable, so each rank's
        gradient includes the statistics' dependence on the other ranks' inputs."""
        from torch.distributed.nn.functional import all_reduce

        z32 = z.float()
        count = torch.full((1,), z32.numel() / z32.shape[1], device=z.device)
        dims = (0, *range(2, z32.dim()))  # all but the channels
        local = torch.cat([z32.sum(dims), (z32 * z32).sum(dims), count])
        total = all_reduce(local, group=self.process_group or dist.group.WORLD)
        c = self.num_features
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.running_mean.lerp_(mean, momentum)
            self.running_var.lerp_(var * n / (n - 1).clamp(min=1), momentum)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        shape = (1, -1, *[1] * (z32.dim() - 2))
        return (z32 * scale.reshape(shape) + shift.reshape(shape)).to(z.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}"
