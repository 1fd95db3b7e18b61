"""`LearnedScaleFakeQuantize`: fake quantization whose step size is learned (LSQ, LSQ+)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_qat.quant.compiled_kernels import zero_unless_positive
from lightning_qat.quant.fake_quantize import (
    FakeQuantize,
    fake_quantize_with_mask,
    mask_for_backward,
    where_in_range,
)
from lightning_qat.quant.layout import flat_in_memory_order
from lightning_qat.quant.observer import MovingAverageMinMaxObserver
from lightning_qat.quant.qparams import MIN_SCALE
from lightning_qat.quant.range_search import lsq_initial_scale, mse_range

#: Activation elements the MSE search of the first batch looks at (a strided sample:
#: the search costs a hundred fake-quant passes).
MSE_SAMPLE = 1 << 18

#: Momentum ``m`` of the oscillation frequency's and the mean code's moving averages
#: (Nagel et al. 2022, section 4.2; 0.01 in their code).
FREEZING_MOMENTUM = 0.01

#: The iterative-freezing state of a weight quantizer, each the weight's shape.
FREEZING_STATE = (
    "oscillation_frequency",
    "previous_codes",
    "previous_direction",
    "mean_codes",
    "frozen",
    "frozen_codes",
)


class _LearnedStepFakeQuant(torch.autograd.Function):
    """``x_hat = s (clamp(round(x/s) + z, qmin, qmax) - z)`` with LSQ's gradients for
    ``s`` and ``z`` (see `LearnedScaleFakeQuantize`).

    The forward pass is the one `FakeQuantize` uses (`fake_quantize_with_mask` per
    tensor), so
    the codes are bit for bit those of the observer-based quantizer on the same grid.
    The backward pass is written out rather than taken from torch's
    ``_fake_quantize_learnable_*`` kernels, whose backward (torch 2.14) turns a negative
    integer zero point into the next one up (``z = -2`` is differentiated as ``-1``;
    tests/test_learned_scale.py measures ours against the formula). Per element, with
    ``m`` the in-range mask: ``d/ds = (x_hat - m x) / s`` (``round(x/s) - x/s`` inside,
    ``qmin - z`` / ``qmax - z`` where clipped), ``d/dz = -s (1 - m)``; both summed per
    step size and multiplied by ``g``.

    With ``dampening`` ``λ > 0`` (weights, `QuantConfig.oscillation_dampening`) the
    input's gradient also gets ``2 λ (x - x_hat)`` where in range: the gradient of Nagel
    et al. 2022's dampening loss ``λ Σ (x_hat - clip(x, s qmin, s qmax))²`` with
    ``x_hat`` held constant (section 4.1, eq. 8); clipped, ``x_hat`` is the clip.

    With ``after_relu`` (the input is a `ReLUBeforeQuantizer`'s output, whose backward
    passes the gradient through) the input's gradient is also zeroed where ``x <= 0``,
    the ReLU's backward, in place after the sums (which use ``m`` alone: ``d/dz`` counts
    an in-range zero as in range): bit for bit the plain ReLU's gradient, one
    activation-sized tensor less per layer.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x,
        scale,
        learned_zero_point,
        zero_point,
        axis,
        quant_min,
        quant_max,
        g,
        after_relu=False,
        dampening=None,
    ):
        if axis is None:
            out, mask = fake_quantize_with_mask(x, scale.detach(), zero_point, quant_min, quant_max)
        else:
            out, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
                x, scale.detach(), zero_point, axis, quant_min, quant_max
            )
        ctx.save_for_backward(x, out, mask_for_backward(mask), scale)
        ctx.axis, ctx.g, ctx.has_zero_point = axis, g, learned_zero_point is not None
        ctx.after_relu, ctx.dampening = after_relu, dampening
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, out, mask, scale = ctx.saved_tensors
        grad, out = _strided_like(grad, x), _strided_like(out, x)
        grad_x = where_in_range(mask, grad)
        s = scale.detach()
        if ctx.axis is None:
            # sum(grad (x_hat - m x)) as two dot products over the tensors' memory: no
            # temporaries (an activation is the size of a batch)
            flat = flat_in_memory_order
            g_flat, gx_flat = flat(grad), flat(grad_x)
            moved = torch.dot(g_flat, flat(out)) - torch.dot(gx_flat, flat(x))
            if ctx.has_zero_point:  # (a symmetric grid has no offset to learn)
                clipped = g_flat.sum() - gx_flat.sum()
        else:  # weights: small
            dims = [d for d in range(x.dim()) if d != ctx.axis]
            moved = (grad * out - grad_x * x).sum(dim=dims)
            if ctx.has_zero_point:
                clipped = (grad - grad_x).sum(dim=dims)
        grad_scale = (ctx.g * moved / s.reshape(-1)).reshape(scale.shape)
        grad_zero_point = None
        if ctx.has_zero_point:
            grad_zero_point = (-ctx.g * clipped * s.reshape(-1)).reshape(scale.shape)
        if ctx.after_relu:  # the joined ReLU's own mask, once the sums above are taken
            grad_x = zero_unless_positive(grad_x, x)
        if ctx.dampening is not None:  # d/dx λ (x_hat - clip(x))², x_hat constant: 0 clipped
            grad_x = grad_x + where_in_range(mask, (2 * ctx.dampening) * (x - out))
        return grad_x, grad_scale, grad_zero_point, None, None, None, None, None, None, None


def _strided_like(t: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``t`` laid out in memory as ``reference`` (the dot products pair elements by
    memory order): a gradient may arrive contiguous for a channels_last activation."""
    if t.stride() == reference.stride():
        return t
    return torch.empty_like(reference).copy_(t)


class LearnedScaleFakeQuantize(FakeQuantize):
    """Fake quantization with a trainable step size: LSQ (Esser et al. 2019, arXiv
    1902.08153) and, for asymmetric grids, LSQ+'s learned offset (Bhalgat et al. 2020,
    arXiv 2004.09576).

    Forward is `FakeQuantize`'s: ``x_hat = s (clamp(round(x / s) + z, qmin, qmax) - z)``,
    with ``z = clamp(round(z_learned), qmin, qmax)``, so the deployed integer model computes
    the same codes. Backward (LSQ section 2.1, eq. 3; `_LearnedStepFakeQuant`):

    - ``d x_hat / d x = 1`` inside the clamp range, 0 outside (straight-through);
    - ``d x_hat / d s = round(x/s) - x/s`` inside, ``qmin - z`` or ``qmax - z`` where
      clipped below or above: the step size learns the trade-off between rounding error
      and clipping error from the loss itself;
    - ``d x_hat / d z = -s`` where clipped, 0 inside (the LSQ+ offset ``β = -s z``, kept
      on the integer grid so that it deploys as a zero point);
    - both scaled by ``g = 1 / sqrt(N Qp)`` (LSQ section 2.2), ``N`` the elements one
      step size quantizes (per output channel for per-channel weights, per sample for
      activations) and ``Qp`` the positive levels (``qmax`` symmetric, ``qmax - qmin``
      asymmetric), so that step sizes and weights learn at comparable relative rates;
      above 4 bits also by `high_bits_damping` (``2^(-1.5 (b - 4))``), without which
      8-bit per-channel weight steps run away (``high_bits_damping="weights"``: weight
      steps only).

    ``scale`` (and, asymmetric, ``learned_zero_point``) are Parameters; ``zero_point``
    is the rounded int32 code as for `FakeQuantize`. Until learning starts the quantizer
    is observer-based: calibration (`lightning_qat.calibrate`, the callback's
    ``calibration_batches``) and evaluation before training set the grid from observed
    ranges. Learning starts at the first training forward with gradients, the observer
    and fake quantization enabled: a weight step size starts from the weight being
    quantized (the folded weight where BN is folded) by ``scale_init``; an activation
    keeps its calibrated range, or starts from its first batch by ``scale_init``. From
    then on the observer no longer moves the grid; disabling the observer
    (``freeze_observer_epoch``) stops the learning (the step size is then constant).
    """

    def __init__(
        self,
        observer: MovingAverageMinMaxObserver,
        bits: int = 8,
        symmetric: bool = True,
        observe_in_eval: bool = False,
        narrow_range: bool = True,
        scale_init: str = "mse",
        high_bits_damping: bool | str = True,
        oscillation_dampening: float = 0.0,
        oscillation_freezing: float = 0.0,
    ):
        self.scale_init = scale_init
        self.high_bits_damping = high_bits_damping
        #: ``λ`` of the oscillation dampening loss (weights; `QuantConfig`)
        self.oscillation_dampening = float(oscillation_dampening)
        super().__init__(observer, bits, symmetric, observe_in_eval, narrow_range)
        #: the final freezing threshold ``f_th`` (weights at LSQ's widths; `QuantConfig`);
        #: 0: no tracking, no freezing
        self.oscillation_freezing = (
            float(oscillation_freezing) if observe_in_eval and bits <= LSQ_BITS else 0.0
        )
        #: the threshold now: the callback anneals it down to ``oscillation_freezing``
        self.freezing_threshold = self.oscillation_freezing
        if self.oscillation_freezing:
            # sized at the first tracked step (the quantizer knows its channels only)
            for name in FREEZING_STATE:
                dtype = {"frozen": torch.bool, "previous_direction": torch.int8}.get(name)
                self.register_buffer(name, torch.empty(0, dtype=dtype or torch.float32))
        self.learning = False
        # the weight the loss has now (the callback ramps it from 0 on a cosine, in place):
        # a tensor, so that torch.compile does not recompile the step for each value
        self.register_buffer(
            "dampening_weight", torch.tensor(self.oscillation_dampening), persistent=False
        )

    def _register_qparams(self, shape: torch.Size) -> None:
        self.scale = nn.Parameter(torch.ones(shape))
        if not self.symmetric:
            self.learned_zero_point = nn.Parameter(torch.zeros(shape))

    @property
    def zero_point(self) -> torch.Tensor:  # type: ignore[override]
        """The zero point the forward pass uses: ``clamp(round(z_learned), qmin, qmax)``
        (int32), zeros for a symmetric grid."""
        if self.symmetric:
            return torch.zeros(self.scale.shape, dtype=torch.int32, device=self.scale.device)
        z = torch.round(self.learned_zero_point.detach()).clamp(self.quant_min, self.quant_max)
        return z.to(torch.int32)

    def enable_fake_quant(self, enabled: bool = True) -> LearnedScaleFakeQuantize:
        """Also marks the grid Parameters trainable or not: a quantizer that only observes
        (the float input of the first layer) gives them no gradient, and DDP registers
        only those that get one."""
        super().enable_fake_quant(enabled)
        for parameter in self.parameters(recurse=False):
            parameter.requires_grad_(enabled)
        return self

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale.detach(), self.zero_point

    @property
    def positive_levels(self) -> int:
        """``Qp`` of LSQ: the codes above the zero point of a range starting at 0."""
        return self.quant_max if self.symmetric else self.quant_max - self.quant_min

    def _set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """The observed grid into the Parameters (before learning starts)."""
        self.scale.data.copy_(scale)
        if not self.symmetric:
            self.learned_zero_point.data.copy_(zero_point.float())

    @torch.compiler.disable
    @torch.no_grad()
    def start_learning(self, x: torch.Tensor) -> None:
        """Initialise the step size for learning from ``x`` (see the class doc) and stop
        following the observer."""
        ch_axis = self.ch_axis if self.per_channel else None
        calibrated = bool(torch.isfinite(self.observer.min_val).all())
        if self.holds_weights or not calibrated:
            values = x.detach().float()
            if not self.holds_weights and values.numel() > MSE_SAMPLE:
                values = values.flatten()[:: math.ceil(values.numel() / MSE_SAMPLE)]
            if self.scale_init == "lsq":
                scale = lsq_initial_scale(values, self.positive_levels, ch_axis)
                if self.symmetric:
                    low, high = -scale * self.quant_max, scale * self.quant_max
                else:  # LSQ's step over a range that starts at the minimum of x
                    low = _range_min(values, ch_axis).clamp(max=0)
                    high = low + scale * self.positive_levels
            elif self.scale_init == "mse":
                low, high = mse_range(
                    values, self.quant_min, self.quant_max, self.symmetric, ch_axis
                )
            else:
                low, high = _range_min(values, ch_axis), _range_max(values, ch_axis)
            if not self.holds_weights and _distributed(self.observer.sync):
                # each rank saw its own first batch: start every rank from their mean
                bounds = torch.stack([low, high])
                dist.all_reduce(bounds)
                low, high = bounds / dist.get_world_size()
            self.observer.min_val.copy_(low)
            self.observer.max_val.copy_(high)
        self.update_qparams()
        self.learning = True

    def gradient_scale(self, x: torch.Tensor) -> float:
        """``g = 1 / sqrt(N Qp)`` (LSQ section 2.2), times ``2^(-1.5 (b - 4))`` above
        ``b = 4`` bits (`high_bits_damping`: every step, weight steps only with
        ``"weights"``, none with ``False``)."""
        if self.holds_weights:
            elements = x.numel() // (self.scale.numel() if self.per_channel else 1)
        else:  # activations: the features of one sample
            elements = x[0].numel() if x.dim() > 1 else x.numel()
        lsq = 1.0 / math.sqrt(max(elements, 1) * self.positive_levels)
        damped = self.high_bits_damping is True or (
            self.high_bits_damping == "weights" and self.holds_weights
        )
        return lsq * high_bits_damping(self.bits) if damped else lsq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        learning_now = training and self.observer_enabled and self.fake_quant_enabled
        if learning_now and not self.learning:
            self.start_learning(x)
        if not self.learning:
            return super().forward(x)  # observer-based, on the detached grid (see `grid`)
        if not self.fake_quant_enabled:
            return x
        # Frozen (observer disabled) or evaluating: the grid is constant. Under DDP a
        # frozen step size still gets a zero gradient: DDP expects one for every Parameter
        # it registered (the callback drops these gradients before the optimizer step).
        damping_now = training and self.holds_weights and self.oscillation_dampening > 0
        if not (learning_now or (training and self.observer.sync) or damping_now):
            return self._with_frozen_codes(self.fake_quantize(x), training, None)
        x32 = x.float()
        if self.clipping_counts is not None:
            self._count_clipped(x32)
        if learning_now:
            with torch.no_grad():  # an optimizer step may have pushed them off the grid
                self.scale.clamp_(min=MIN_SCALE)
                if not self.symmetric:
                    self.learned_zero_point.clamp_(self.quant_min, self.quant_max)
        zero_point = None if self.symmetric else self.learned_zero_point
        factor = self.gradient_scale(x32) if learning_now else 0.0
        out = _LearnedStepFakeQuant.apply(
            x32,
            self.scale,
            zero_point,
            self.per_channel_zero_point() if self.per_channel else self.zero_point,
            self.ch_axis if self.per_channel else None,
            self.quant_min,
            self.quant_max,
            factor,
            self.input_after_relu,
            self.dampening_weight.detach() if damping_now else None,
        )
        return self._with_frozen_codes(out, training, factor if learning_now else None).to(x.dtype)

    def _with_frozen_codes(
        self, out: torch.Tensor, training: bool, gradient_scale: float | None
    ) -> torch.Tensor:
        """``out`` with the frozen weights on their frozen codes (iterative weight
        freezing, Nagel et al. 2022 section 4.2), after a training step has been tracked.

        A frozen weight's value is ``s (q_frozen - z)``: no gradient reaches its latent
        weight (it is constant), its step size gets ``g q_frozen`` from it (``d/ds`` of
        ``s q``, scaled by LSQ's ``g`` as every other element's, ``gradient_scale``; none
        where the step is not learning)."""
        if not self.oscillation_freezing:
            return out
        shape = (-1, *[1] * (out.dim() - 1)) if self.per_channel else ()
        scale = self.scale.detach().reshape(shape)
        if training:
            self._track_oscillations(torch.round(out.detach() / scale))
        if self.frozen.shape != out.shape:  # not tracked yet: nothing frozen
            return out
        if gradient_scale is not None:  # the value of s, the gradient of g s
            learned = self.scale.reshape(shape)
            scale = learned * gradient_scale + (learned * (1 - gradient_scale)).detach()
        zero_point = self.zero_point.reshape(shape)
        codes = (self.frozen_codes + zero_point).clamp(self.quant_min, self.quant_max)
        return torch.where(self.frozen, scale * (codes - zero_point), out)

    @torch.compiler.disable
    @torch.no_grad()
    def _track_oscillations(self, codes: torch.Tensor) -> None:
        """One training step of Nagel et al. 2022's iterative weight freezing (section
        4.2) on the integer codes ``q`` (relative to the zero point) of the weights.

        A weight oscillates at step ``t`` when its code changes in the direction opposite
        to its previous change: ``o_t = sign(q_t - q_{t-1}) sign(Δ_prev) = -1``. Its
        oscillation frequency is the moving average ``f_t = m o_t + (1 - m) f_{t-1}``
        (``m`` = `FREEZING_MOMENTUM`); once ``f_t`` exceeds the threshold (annealed by the
        callback) the weight is frozen for the rest of training, on its mean code
        ``round(q̄)``, ``q̄_t = m q_t + (1 - m) q̄_{t-1}`` (the middle of its oscillation
        rather than wherever the last step left it)."""
        if self.frozen.shape != codes.shape:  # the first tracked step
            for name in FREEZING_STATE:
                setattr(self, name, torch.zeros_like(codes, dtype=getattr(self, name).dtype))
            self.previous_codes.copy_(codes)
            self.mean_codes.copy_(codes)
            return
        m = FREEZING_MOMENTUM
        direction = torch.sign(codes - self.previous_codes).to(torch.int8)
        oscillated = (direction * self.previous_direction) < 0
        self.oscillation_frequency.mul_(1 - m).add_(oscillated, alpha=m)
        moved = direction != 0
        self.previous_direction.copy_(torch.where(moved, direction, self.previous_direction))
        self.previous_codes.copy_(codes)
        newly = (self.oscillation_frequency > self.freezing_threshold) & ~self.frozen
        self.frozen_codes.copy_(torch.where(newly, torch.round(self.mean_codes), self.frozen_codes))
        self.frozen.logical_or_(newly)
        self.mean_codes.mul_(1 - m).add_(codes, alpha=m)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # the freezing state is sized at the first tracked step: take the checkpoint's size
        for name in FREEZING_STATE if self.oscillation_freezing else ():
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                current = getattr(self, name)
                setattr(self, name, current.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "learning": self.learning}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.enable_fake_quant(self.fake_quant_enabled)
        self.learning = bool(state.get("learning", False))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learned_scale, learning={self.learning}"


#: The widest grid on which LSQ's gradient scale is used as published.
LSQ_BITS = 4


def high_bits_damping(bits: int) -> float:
    """The factor on LSQ's step-size gradient scale: 1 up to `LSQ_BITS` bits, then
    ``2^(-1.5 (bits - 4))`` (1/64 at 8 bits).

    Why (measured and derived here, not from the LSQ paper, whose results are at 2-4
    bits with a step per tensor): a clipped element adds ``Qp`` times its gradient to the
    step's, a rounded one at most 1/2 of it, so with ``g = 1/sqrt(N Qp)`` and a step
    ``s = T / Qp`` for a clipping threshold ``T``, one clipped element moves ``s`` by a
    fraction ``lr g Qp grad / s`` that grows as ``Qp^1.5`` (``/ sqrt(N)``). At 4 bits LSQ
    is balanced as its section 2.2 intends: ResNet-20's weight steps change by a median
    0.14% a step, its weights by 0.15%. At 8 bits per-channel steps (``N`` = 27 to 576)
    change by a median 0.9% and outliers by orders of magnitude; a step driven to ~0
    clips its whole channel, the opposite gradient then throws it past every weight
    (every code 0, the channel dead): 103 of 794 channels 10x off their start and 48 dead
    after 60 steps. The factor holds a clipped element's leverage at its 4-bit value,
    ``(Qp(4) / Qp(b))^1.5 = 2^(-1.5 (b - 4))``; 8-bit steps then change by a median
    0.03% a step, none 10x off, none dead (traced with ``scripts/step_size_trace.py``,
    README "Low bit widths"). Every step above 4 bits by default, the activation steps
    too (8-bit first and last inputs, residual path): ResNet-20 W2A2 (8-bit first/last
    layers and residual path, full weight grid), three seeds each (README): 66.90% mean
    (std 0.64) damping every step, 66.02% (std 1.86) the weight steps only
    (``"weights"``); W4A4 likewise: 70.27%, 70.52%, and 70.65% undamped, within the
    seed-to-seed spread (FP32 71.78%)."""
    return 1.0 if bits <= LSQ_BITS else 2.0 ** (-1.5 * (bits - LSQ_BITS))


def _distributed(sync: bool) -> bool:
    return sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _range_min(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if ch_axis is None:
        return flat_in_memory_order(x).min()
    return x.movedim(ch_axis, 0).flatten(1).amin(dim=1)


def _range_max(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if ch_axis is None:
        return flat_in_memory_order(x).max()
    return x.movedim(ch_axis, 0).flatten(1).amax(dim=1)
