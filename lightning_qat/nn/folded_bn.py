"""`FoldedBatchNorm2d`: what stands where a BatchNorm stood once it is folded."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
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

    def normalize_rescaled(
        self, y: torch.Tensor, inv_factor: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """`normalize` of ``z = y · inv_factor (+ bias)``, ``inv_factor`` and ``bias``
        shaped per map (``[1, C, 1, ...]``), with ``z`` written over ``y``: the caller owns
        ``y`` (a convolution's output, which the convolution's backward does not read)
        and ``inv_factor`` is a constant for autograd.

        Values and gradients are bit for bit those of ``normalize(y.mul_(inv_factor) +
        bias)``. On the CPU in float32 (one process, training with gradients, not under
        torch.compile) one autograd node does both, and its backward multiplies the
        BatchNorm's input gradient by ``inv_factor`` in place: autograd's backward of
        the multiplication writes a new activation-sized tensor instead, which under
        glibc's default allocator is a fresh mmap zero-filled every step
        (``bench/qat_overhead.py``). Elsewhere (a GPU's batch norm runs other kernels;
        a compiled graph plans its own buffers) it is that very expression."""
        fused = (
            not torch.compiler.is_compiling()  # first: dynamo does not trace .grad_fn
            and torch.is_grad_enabled()
            and y.grad_fn is not None  # an op's output, not a leaf (written over)
            and y.device.type == "cpu"
            and y.dtype == torch.float32
            and y.numel() > y.shape[1]  # more than one value per channel (else F.batch_norm raises)
            and self._world_size() == 1
        )
        if not fused:
            z = y.mul_(inv_factor.to(y.dtype))
            if bias is not None:
                z = z + bias.to(z.dtype)
            return self.normalize(z)
        return _RescaledBatchNorm.apply(
            y,
            inv_factor,
            bias,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self._momentum(),
            self.eps,
        )

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


class _RescaledBatchNorm(torch.autograd.Function):
    """``batch_norm(y · d + b)`` in training mode (batch statistics, running ones
    updated), ``y · d + b`` written over ``y``; ``d`` takes no gradient.

    The backward is what autograd runs for ``F.batch_norm`` after ``y.mul_(d) + b``
    (aten's ``native_batch_norm_backward``, then the broadcast sum for ``b``, then the
    product with ``d``), with the product written over the BatchNorm's input gradient,
    which this node made and nothing else reads: one activation-sized tensor less per
    folded layer and step. See `FoldedBatchNorm2d.normalize_rescaled`."""

    @staticmethod
    def forward(
        ctx, y, inv_factor, bias, weight, bn_bias, running_mean, running_var, momentum, eps
    ):  # type: ignore[override]
        z = y.detach().mul_(inv_factor)
        if bias is not None:
            z.add_(bias)
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            z, weight, bn_bias, running_mean, running_var, True, momentum, eps
        )
        # (training mode: the backward reads the batch statistics, not the running ones)
        ctx.save_for_backward(z, inv_factor, weight, mean, invstd)
        ctx.eps = eps
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        z, inv_factor, weight, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_z, grad_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_out,
            z,
            weight,
            None,
            None,
            mean,
            invstd,
            True,
            ctx.eps,
            [needs[0] or needs[2], needs[3], needs[4]],
        )
        grad_bias = None
        if needs[2]:
            grad_bias = grad_z.sum_to_size(ctx.bias_shape)  # before grad_z is overwritten
        grad_y = grad_z.mul_(inv_factor) if needs[0] else None
        return grad_y, None, grad_bias, grad_weight, grad_bn_bias, None, None, None, None
