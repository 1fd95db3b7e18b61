"""`FakeQuantize`: simulated quantization with a straight-through gradient."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from lightning_qat.quant.compiled_kernels import fake_quantize_compiled, masked_gradient
from lightning_qat.quant.config import QuantConfig
from lightning_qat.quant.observer import MinMaxObserver, MovingAverageMinMaxObserver
from lightning_qat.quant.qparams import compute_qparams, quant_range


def _register_fake_kernels() -> None:
    """Shapes for torch.compile of the two fused kernels torch ships without a fake-tensor
    kernel (``torch._dynamo`` breaks the graph at each call otherwise: 5 breaks in a QAT
    LeNet step). Outputs are the input's shape, the mask bool; the kernels themselves are
    unchanged, so compiled numerics are the eager ones."""
    ops = (
        "aten::fake_quantize_per_channel_affine_cachemask",
        "aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    )
    for op in ops:
        with contextlib.suppress(RuntimeError):  # a later torch ships its own: keep it
            torch.library.register_fake(op)(_same_shape_and_mask)


def _same_shape_and_mask(x: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


_register_fake_kernels()


def fake_quantize_elementwise(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int | torch.Tensor,
    quant_max: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fake quantization and its in-range mask, in pointwise torch ops.

    The arithmetic of torch's CPU kernel (``_fake_quantize_tensor_helper`` in ATen's
    ``QuantizedOpKernels.cpp``), step for step in float32:
    ``q = z + nearbyint(x * (1 / s))``, ``mask = qmin <= q <= qmax``,
    ``x_hat = (fmin(fmax(q, qmin), qmax) - z) * s``, where ``fmax`` turns a NaN into
    ``qmin``. Bit for bit the kernel's output (``tests/test_fake_quant_elementwise.py``),
    but as ops that torch.compile's inductor fuses into the loop that writes the layer's
    output (the BatchNorm, the ReLU), where the aten kernel would be an opaque call with
    a pass of its own. The NaN is replaced by comparing ``q`` with itself: inductor's
    CPU code for ``isnan`` (``nan_to_num``) is a scalar loop inside the vector loop.
    Used when compiling; eager keeps the one-pass kernel.
    """
    inverse_scale = torch.reciprocal(scale)
    q = torch.round(x * inverse_scale) + zero_point.float()
    mask = (q >= quant_min) & (q <= quant_max)
    # ±inf clamp to the grid's ends as in fmin/fmax; only a NaN needs replacing
    clamped = torch.where(q == q, q, quant_min).clamp(quant_min, quant_max)
    return (clamped - zero_point.float()) * scale, mask


def fake_quantize_with_mask(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    after_relu: bool = False,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fake quantization and its in-range mask (ANDed with ``x > 0`` when
    ``after_relu``: the input is a ReLU's output whose gradient mask this one applies),
    the same bits on every path:

    - under torch.compile, `fake_quantize_elementwise` (inductor fuses it into the loops
      around it);
    - in eager mode on the CPU (float32), `fake_quantize_compiled`: one compiled pass,
      the mask as uint8;
    - elsewhere torch's fused one-pass kernel, the mask as bool.

    Keep the mask for the backward pass with `mask_for_backward`; `where_in_range` applies
    either dtype. ``in_place`` lets the compiled pass write the result over ``x`` (a
    ReLU's output that nothing else reads): where it does, the output is ``x`` itself.
    """
    if torch.compiler.is_compiling():
        out, mask = fake_quantize_elementwise(x, scale, zero_point, quant_min, quant_max)
    else:
        compiled = fake_quantize_compiled(
            x, scale, zero_point, quant_min, quant_max, after_relu, in_place
        )
        if compiled is not None:
            return compiled
        # The "fake quant enabled" flag as the public op passes it: int64, on x's device
        # (the CUDA kernel reads it on the device).
        enabled = torch.ones(1, dtype=torch.long, device=x.device)
        out, mask = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, scale, zero_point, enabled, quant_min, quant_max
        )
    if after_relu:  # (a NaN is out of range: its mask is already False)
        mask &= x > 0
    return out, mask


def mask_for_backward(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as kept for the backward pass: as it is in eager mode, as uint8 (0 or 1)
    under torch.compile. Inductor's CPU code moves bool tensors to and from memory
    element by element: writing the mask of a 25 MB activation took 14-27 ms and reading
    it back 10 ms, against about 1 ms each way as uint8 (2 cores, AVX-512;
    ``tests/test_compiled_kernels.py`` checks that no bool tensor is written)."""
    if torch.compiler.is_compiling():
        return torch.where(mask, 1, 0).to(torch.uint8)
    return mask


def where_in_range(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``mask`` (bool, or uint8 from `mask_for_backward` or
    `fake_quantize_compiled`) is set, else 0.

    In eager mode a uint8 mask goes through the compiled `masked_gradient` (bit for bit
    the selection). Under torch.compile it multiplies: any comparison that turns it back
    into bool is moved by the partitioner into the forward graph, which then stores the
    bool mask again. The product equals the selection except for the sign of a zero
    (``-g * 0 = -0.0``) and a non-finite ``g`` (whose step the non-finite guard skips anyway)."""
    if mask.dtype == torch.bool:
        return torch.where(mask, grad, 0.0)
    if not torch.compiler.is_compiling():  # the mask of the compiled eager pass
        return masked_gradient(grad, mask)
    return grad * mask


class _PerTensorFakeQuant(torch.autograd.Function):
    """Per-tensor fake quantization whose backward is one masked select.

    Forward is `fake_quantize_with_mask`: in eager mode on the CPU one compiled
    vectorized pass (uint8 mask, the ReLU's ``x > 0`` folded in), elsewhere torch's fused
    kernel (the one behind ``torch.fake_quantize_per_tensor_affine`` with tensor qparams),
    which also returns the in-range mask; bit for bit the same output and gradient.
    torch's own backward casts the bool mask to float and multiplies (two full-size passes
    and two allocations per activation); ``torch.where(mask, grad, 0)`` is one.
    ``bench/qat_overhead.py`` measures the training step.

    With ``after_relu`` (the input is a `ReLUBeforeQuantizer`'s output, whose own
    backward passes the gradient through), the mask also holds the ReLU's ``x > 0``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, after_relu, in_place=False):  # type: ignore[override]
        out, mask = fake_quantize_with_mask(
            x, scale, zero_point, quant_min, quant_max, after_relu, in_place
        )
        if out is x:
            ctx.mark_dirty(x)
        ctx.save_for_backward(mask_for_backward(mask))
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return where_in_range(mask, grad), None, None, None, None, None, None


def reads_deferred_relu_output(x: torch.Tensor) -> bool:
    """Whether ``x`` came straight from an autograd Function that marks its output as
    owned by the quantizer reading it (``hands_output_to_quantizer``: the deferred-mask
    ReLU of `lightning_qat.nn.ReLUBeforeQuantizer`, whose one reader `prepare_qat`
    checked in the traced graph, and which saves nothing for its backward). Such an
    input may be overwritten by its fake-quantized value."""
    forward_class = getattr(x.grad_fn, "_forward_cls", None)
    return getattr(forward_class, "hands_output_to_quantizer", False)


class FakeQuantize(nn.Module):
    """Quantize and dequantize in float: ``x_hat = s * (clamp(round(x / s) + z, qmin, qmax) - z)``.

    The forward pass rounds as the integer model will; the backward pass is the
    straight-through estimator, gradient 1 inside the clamp range and 0 outside
    (Jacob et al. 2018 section 3; Bengio et al. 2013), computed by torch's fused kernels
    (those of ``torch.fake_quantize_per_tensor_affine`` and
    ``torch.fake_quantize_per_channel_affine``).

    ``scale`` (float32) and ``zero_point`` (int32) are buffers, 0-d per tensor or 1-d per
    channel; the switches ``fake_quant_enabled`` and ``observer_enabled`` travel in
    ``state_dict`` as extra state. Computation is in float32 whatever the input dtype
    (a bf16 grid cannot hold 256 levels at every scale, so under bf16/fp16 autocast the
    rounding must not happen in bf16); the result is returned in the input's dtype.

    The observer updates the range only in training mode, except where
    ``observe_in_eval`` is set: a weight range is a pure function of the current weights,
    so recomputing it in eval keeps the scale in step with the last optimizer update,
    whereas an activation range is a running statistic of the training data and must not
    move during validation.
    """

    #: The input is the output of a `lightning_qat.nn.ReLUBeforeQuantizer`, whose
    #: gradient mask this quantizer applies (set by `prepare_qat`).
    input_after_relu: bool = False

    def __init__(
        self,
        observer: MovingAverageMinMaxObserver,
        bits: int = 8,
        symmetric: bool = True,
        observe_in_eval: bool = False,
        narrow_range: bool = True,
    ):
        super().__init__()
        self.observer = observer
        self.bits = bits
        self.symmetric = symmetric
        self.quant_min, self.quant_max = quant_range(bits, symmetric, narrow_range)
        self.observe_in_eval = observe_in_eval
        self._register_qparams(observer.min_val.shape)
        if symmetric:
            # The zero point handed to torch's fused per-channel kernel: 0.0 as float.
            # Given an integer zero point the kernel first checks its range on the host
            # (``min(z).item()``, ``max(z).item()``: two waits for a GPU per weight per
            # step); given a float one it skips the check, and ``round(x/s + 0.0)`` is
            # ``round(x/s) + 0``: the same codes (tests/test_fake_quantize.py). Not in
            # state_dict: it is always zero.
            self.register_buffer(
                "kernel_zero_point", torch.zeros(observer.min_val.shape), persistent=False
            )
        self.fake_quant_enabled = True
        self.observer_enabled = True
        # When a dict, forward adds the number of elements it clipped and saw (the QAT
        # callback samples one batch an epoch; counting costs a pass and a host sync).
        self.clipping_counts: dict[str, int] | None = None

    def _register_qparams(self, shape: torch.Size) -> None:
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))

    @classmethod
    def for_weights(cls, config: QuantConfig, num_channels: int) -> FakeQuantize:
        """Weight quantizer: range of the current weights, per output channel (axis 0)
        when ``config.per_channel``, on the narrow or full symmetric range by
        ``config.weight_narrow_range``; a `LearnedScaleFakeQuantize` with
        ``config.learn_scale``."""
        observer = MinMaxObserver(num_channels if config.per_channel else None, ch_axis=0)
        return _quantizer_class(cls, config)(
            observer,
            config.weight_bits,
            config.symmetric,
            observe_in_eval=True,
            narrow_range=config.weight_narrow_range,
            **_learned(config, weights=True),
        )

    @classmethod
    def for_activations(cls, config: QuantConfig) -> FakeQuantize:
        """Activation quantizer: per tensor, EMA or current-batch min/max; a
        `LearnedScaleFakeQuantize` with ``config.learn_scale``."""
        if config.observer == "ema":
            observer = MovingAverageMinMaxObserver(config.ema_momentum)
        else:
            observer = MinMaxObserver()
        return _quantizer_class(cls, config)(
            observer,
            config.activation_bits,
            config.activations_symmetric,
            **_learned(config, weights=False),
        )

    @property
    def holds_weights(self) -> bool:
        """A weight quantizer (its range is a function of the weights, observed in eval
        too), as opposed to an activation quantizer."""
        return self.observe_in_eval

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() == 1

    @property
    def ch_axis(self) -> int:
        return self.observer.ch_axis

    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantize:
        self.fake_quant_enabled = enabled
        return self

    def enable_observer(self, enabled: bool = True) -> FakeQuantize:
        self.observer_enabled = enabled
        return self

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` as the forward pass uses them (constants: no gradient)."""
        return self.scale, self.zero_point

    def per_channel_zero_point(self) -> torch.Tensor:
        """The zero point torch's per-channel kernel receives: ``kernel_zero_point`` (float
        zeros, no host-side range check) on a symmetric grid, else ``zero_point``."""
        return self.kernel_zero_point if self.symmetric else self.zero_point

    @torch.no_grad()
    def update_qparams(self) -> None:
        """Recompute ``scale`` and ``zero_point`` from the observer's range."""
        scale, zero_point = compute_qparams(
            self.observer.min_val,
            self.observer.max_val,
            self.quant_min,
            self.quant_max,
            self.symmetric,
        )
        self._set_grid(scale, zero_point)

    def _set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        observing = self.observer_enabled and (self.training or self.observe_in_eval)
        if not (observing or self.fake_quant_enabled):
            return x
        if observing:
            self.observer(x)
            self.update_qparams()
        if not self.fake_quant_enabled:
            return x
        return self.fake_quantize(x)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the current grid (no observing), in float32, returned in x's dtype."""
        x32 = x.float()
        if self.clipping_counts is not None:
            self._count_clipped(x32)
        scale, zero_point = self.grid()
        if self.per_channel:
            out = torch.fake_quantize_per_channel_affine(
                x32,
                scale,
                self.per_channel_zero_point(),
                self.ch_axis,
                self.quant_min,
                self.quant_max,
            )
        elif torch.is_grad_enabled() and x32.requires_grad:
            # over the ReLU's output when nothing else reads it (one allocation less;
            # a compiled graph plans its own memory)
            in_place = (
                self.input_after_relu
                and not torch.compiler.is_compiling()
                and reads_deferred_relu_output(x32)
            )
            out = _PerTensorFakeQuant.apply(
                x32,
                scale,
                zero_point,
                self.quant_min,
                self.quant_max,
                self.input_after_relu,
                in_place,
            )
        else:  # inference: no mask to keep, and a plain aten op for tracing and export
            out = torch.fake_quantize_per_tensor_affine(
                x32, scale, zero_point, self.quant_min, self.quant_max
            )
        return out.to(x.dtype)

    @torch.no_grad()
    def _count_clipped(self, x: torch.Tensor) -> None:
        """Elements outside the representable range ``[s (qmin - z), s (qmax - z)]``."""
        shape = [1] * x.dim()
        if self.per_channel:
            shape[self.ch_axis] = -1
        scale = self.scale.reshape(shape)
        zero_point = self.zero_point.reshape(shape)
        low = (self.quant_min - zero_point) * scale
        high = (self.quant_max - zero_point) * scale
        # half a step of slack: values that round onto qmin/qmax are not clipped
        clipped = (x < low - scale / 2) | (x > high + scale / 2)
        # a device tensor, read by the callback at epoch end: no host sync in the step
        self.clipping_counts["clipped"] = self.clipping_counts["clipped"] + clipped.sum()
        self.clipping_counts["total"] += x.numel()

    # The switches are plain attributes (no host sync to read them on an accelerator);
    # extra state carries them through state_dict and checkpoints.
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "fake_quant_enabled": self.fake_quant_enabled,
            "observer_enabled": self.observer_enabled,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.fake_quant_enabled = bool(state["fake_quant_enabled"])
        self.observer_enabled = bool(state["observer_enabled"])

    def extra_repr(self) -> str:
        scheme = "symmetric" if self.symmetric else "asymmetric"
        granularity = "per_channel" if self.per_channel else "per_tensor"
        return (
            f"bits={self.bits}, {scheme}, {granularity}, "
            f"range=[{self.quant_min}, {self.quant_max}], "
            f"fake_quant={self.fake_quant_enabled}, observer={self.observer_enabled}"
        )


def _quantizer_class(cls: type[FakeQuantize], config: QuantConfig) -> type[FakeQuantize]:
    if not config.learn_scale or cls is not FakeQuantize:
        return cls
    from lightning_qat.quant.learned_fake_quantize import LearnedScaleFakeQuantize

    return LearnedScaleFakeQuantize


def _learned(config: QuantConfig, weights: bool) -> dict[str, Any]:
    if not config.learn_scale:
        return {}
    learned = {"scale_init": config.scale_init, "high_bits_damping": config.high_bits_damping}
    if weights:
        learned["oscillation_dampening"] = float(config.oscillation_dampening)
        learned["oscillation_freezing"] = float(config.oscillation_freezing)
    return learned
