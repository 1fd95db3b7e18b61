"""`ReLUBeforeQuantizer`: a ReLU whose gradient mask the quantizer reading it applies."""

from __future__ import annotations

import torch
from torch import fx, nn

from lightning_qat.quant import FakeQuantize, LearnedScaleFakeQuantize


class _ReLUMaskDeferred(torch.autograd.Function):
    """``max(x, 0)`` forward; the backward passes the gradient through unmasked and saves
    nothing: the one reader of the output (a quantizer with ``input_after_relu``) masks
    it by ``y > 0`` together with its own straight-through mask. Its output is read by
    that quantizer alone, which may therefore write its result over it."""

    hands_output_to_quantizer = True

    @staticmethod
    def forward(ctx, x, inplace):  # type: ignore[override]
        if inplace:
            ctx.mark_dirty(x)
            x.clamp_min_(0)
            return x  # the very input object (torch.compile checks that it is returned)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class ReLUBeforeQuantizer(nn.ReLU):
    """An ``nn.ReLU`` whose only reader is a per-tensor activation quantizer: in training
    the two act as one op, ``Q(relu(x))``, keeping one bool mask for the backward.

    A plain ReLU keeps its float output for its backward (``grad · 1[y > 0]``) while the
    quantizer keeps its in-range mask ``1[qmin <= round(y/s) + z <= qmax]``; the next
    layer keeps the quantized value. Here the ReLU keeps nothing and the quantizer
    (``input_after_relu``) saves ``1[y > 0] · 1[in range]``: the same gradient, bit for
    bit, one float activation less per ReLU held until the backward (a NIN training
    step's peak memory: 1.54x FP32's -> 1.27x, ``bench/qat_overhead.py``), and one
    full-size backward pass less. Since nothing else reads the ReLU's output, the
    quantizer's compiled CPU pass writes its result over it (one activation-sized
    allocation less per ReLU; under glibc's default allocator each one is a fresh mmap
    that the kernel zero-fills, every step). Were the output kept by anything else for
    its backward, autograd's version check would refuse the step rather than let it be
    overwritten unseen; a forward hook on the ReLU that keeps its output (for logging,
    say) sees the quantized values once the quantizer has run.

    `prepare_qat` turns an ``nn.ReLU`` into this class (in place, as
    ``torch.nn.utils.parametrize`` does: hooks, children and state stay) where the
    traced graph shows that it is called once and that its output goes to one quantizer
    and nothing else. The mask is deferred only while the quantizer fake-quantizes
    (``fake_quant_enabled``); in eval, without autograd, and under torch.fx symbolic
    tracing it is an ``nn.ReLU``.
    """

    #: The quantizer that reads this ReLU's output (not a registered child: it belongs to
    #: the layer, or to this module as its ``output_quantizer``).
    reader: FakeQuantize

    @classmethod
    def convert(cls, relu: nn.ReLU, reader: FakeQuantize) -> ReLUBeforeQuantizer:
        """Turn ``relu`` (in place) into this class, ``reader`` applying its mask."""
        if type(relu) is not nn.ReLU:
            raise TypeError(f"expected an nn.ReLU, got {type(relu).__name__}")
        if not cls.can_read(reader):
            raise TypeError(
                "the reader must be a per-tensor FakeQuantize or LearnedScaleFakeQuantize"
            )
        relu.__class__ = cls
        object.__setattr__(relu, "reader", reader)
        reader.input_after_relu = True
        return relu

    @staticmethod
    def can_read(quantizer: nn.Module) -> bool:
        """Whether ``quantizer`` applies the ReLU's mask (``input_after_relu``): a
        per-tensor `FakeQuantize` or `LearnedScaleFakeQuantize`."""
        return type(quantizer) in (FakeQuantize, LearnedScaleFakeQuantize) and not (
            quantizer.per_channel
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.training
            and torch.is_grad_enabled()
            and self.reader.fake_quant_enabled
            and not isinstance(x, fx.Proxy)
        ):
            return _ReLUMaskDeferred.apply(x, self.inplace)
        return super().forward(x)
