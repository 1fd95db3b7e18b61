"""Per-tensor fake quantization in eager mode on the CPU, as one vectorized pass compiled
by torch's inductor.

torch's CPU kernel for per-tensor fake quantization with its mask
(``_fake_quantize_per_tensor_affine_cachemask_tensor_qparams``) is a scalar loop: 22 ms
for a 50 MB activation on 2 cores (AVX-512), where a ReLU takes 2.2 ms, and the
straight-through backward's ``torch.where`` 8.5 ms (``python bench/qat_overhead.py``
measures the whole step). The same arithmetic written in pointwise torch ops
(`fake_quantize_elementwise`, bit for bit the kernel's output and mask) and compiled
once by inductor runs in one vectorized pass; the ReLU's ``x > 0`` (a
`ReLUBeforeQuantizer` before the quantizer) joins the same pass, and the mask is kept
as uint8 (inductor moves bool tensors element by element).

The compiled functions see 1-d tensors in memory order only (any dense layout, any
shape: one compilation for all layers, dynamic length), and the results are viewed back
in the input's layout. Compilation needs a C++ compiler; where it fails (none
installed, an unsupported platform) a warning says so once and torch's kernels are used.
``LIGHTNING_QAT_COMPILED_KERNELS=0`` turns the compiled path off.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from lightning_qat.quant.layout import flat_in_memory_order, memory_order

_ENV = "LIGHTNING_QAT_COMPILED_KERNELS"
_state: dict[str, object] = {"failed": False}


def compiled_kernels_enabled() -> bool:
    """Whether eager CPU fake quantization uses the compiled pass (not turned off with
    ``LIGHTNING_QAT_COMPILED_KERNELS=0``, and its compilation has not failed)."""
    return os.environ.get(_ENV, "1") != "0" and not _state["failed"]


def _quantize_with_mask(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: torch.Tensor,
    quant_max: torch.Tensor,
    after_relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_qat.quant.fake_quantize import fake_quantize_elementwise

    out, mask = fake_quantize_elementwise(x, scale, zero_point, quant_min, quant_max)
    if after_relu:
        mask = mask & (x > 0)
    return out, torch.where(mask, 1, 0).to(torch.uint8)


# One function per variant: torch.compile keeps one cache (and one recompile limit) per
# function, so the two never evict each other.
def _forward(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_with_mask(*args, after_relu=False)


def _forward_after_relu(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_with_mask(*args, after_relu=True)


def _forward_after_relu_in_place(x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    # inductor writes x_hat into x's memory in the same loop that reads x (one pass)
    out, mask = _quantize_with_mask(x, *args, after_relu=True)
    x.copy_(out)
    return mask


def _backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # through float: inductor vectorizes a uint8 -> float compare, not a uint8 one
    return torch.where(mask.to(grad.dtype) != 0, grad, 0.0)


def _zero_unless_positive_in_place(grad: torch.Tensor, x: torch.Tensor) -> None:
    grad.copy_(torch.where(x > 0, grad, 0.0))


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _state:
        _state[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _state[name]  # type: ignore[return-value]


def _usable(*tensors: torch.Tensor) -> bool:
    return (
        compiled_kernels_enabled()
        and not torch.compiler.is_compiling()
        and all(
            # plain tensors only: a subclass (fake, functional, traced) keeps torch's kernel
            type(t) in (torch.Tensor, torch.nn.Parameter)
            and t.device.type == "cpu"
            and t.dtype == torch.float32
            for t in tensors
        )
    )


def _run(name: str, fn: Callable, *args: object) -> object | None:
    try:
        # one grad mode and autocast state for every call (a change would recompile; the
        # arithmetic is float32 whatever the caller's autocast)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return _compiled(name, fn)(*args)
    except Exception as error:  # no C++ compiler, or inductor cannot build here
        _state["failed"] = True
        warnings.warn(
            f"lightning-qat could not compile its CPU fake-quantization pass ({error!r:.200}); "
            "using torch's slower kernels instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory without gaps (any order of dimensions)."""
    return t.permute(memory_order(t)).is_contiguous()


def _flat_alias(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in memory order as a 1-d tensor on the same memory that is not a
    view: torch.compile guards on a view's base (its strides, its sizes), which would
    recompile the pass for every layer shape."""
    flat = flat_in_memory_order(t.detach())
    return flat.new_empty(0).set_(flat.untyped_storage(), flat.storage_offset(), flat.shape)


def _in_layout_of(flat: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The 1-d ``flat`` (``reference``'s elements in memory order) with ``reference``'s
    shape and layout: the same memory, but not a view of ``flat`` (autograd forbids
    in-place updates of a view made inside a custom Function, and a residual ``+=`` or an
    in-place ReLU may follow a quantizer)."""
    order = memory_order(reference)
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    shaped = flat.view([reference.shape[d] for d in order]).permute(inverse)
    return flat.new_empty(0).set_(flat.untyped_storage(), 0, shaped.shape, shaped.stride())


def fake_quantize_compiled(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    after_relu: bool = False,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x_hat, mask)``: `fake_quantize_elementwise` of a float32 CPU tensor in one
    compiled pass, the mask (ANDed with ``x > 0`` when ``after_relu``) as uint8, both in
    ``x``'s layout; None where the compiled pass is not available (then use torch's
    kernel).

    With ``in_place`` and ``after_relu`` (the caller owns ``x``: a ReLU's output read by
    nothing else), ``x_hat`` is written over a dense ``x`` and returned as ``x`` itself:
    one activation-sized allocation less per quantized ReLU, which under glibc's default
    allocator is a fresh mmap whose pages the kernel zero-fills every step."""
    if not _usable(x) or x.dim() == 0 or x.numel() == 0:
        return None
    dense = _dense(x)
    # the grid's ends as tensors: one compilation for every bit width
    bounds = torch.tensor([quant_min, quant_max], dtype=torch.float32).unbind()
    qparams = (scale.detach(), zero_point.detach(), *bounds)
    if in_place and after_relu and dense:
        fn = _forward_after_relu_in_place
        mask = _run(fn.__name__, fn, _flat_alias(x), *qparams)
        if mask is None:
            return None
        # written through an alias: tell autograd, so that a saved copy of x fails loudly
        torch.autograd.graph.increment_version(x)
        return x, _in_layout_of(mask, x)  # type: ignore[arg-type]
    if not dense:
        x = x.contiguous()  # a tensor with gaps: quantize a dense copy
    fn = _forward_after_relu if after_relu else _forward
    result = _run(fn.__name__, fn, _flat_alias(x), *qparams)
    if result is None:
        return None
    out, mask = result  # type: ignore[misc]
    return _in_layout_of(out, x), _in_layout_of(mask, x)


def masked_gradient(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad`` where the uint8 ``mask`` of `fake_quantize_compiled` is set, else 0, in one
    compiled pass (``torch.where`` with ``mask != 0`` where it is not available)."""
    if _usable(grad):
        if grad.stride() != mask.stride():
            grad = torch.empty_like(mask, dtype=grad.dtype).copy_(grad)
        flat_grad, flat_mask = _flat_alias(grad), _flat_alias(mask)
        result = _run("backward", _backward, flat_grad, flat_mask)
        if result is not None:
            return _in_layout_of(result, mask)  # type: ignore[arg-type]
    return torch.where(mask != 0, grad, 0.0)


def zero_unless_positive(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``x > 0``, else 0: a ReLU's backward (``x`` its output), written over
    ``grad`` in one compiled pass where it is available and the two share a layout (the
    caller owns ``grad``), else ``torch.where`` (a new tensor)."""
    if _usable(grad, x) and grad.stride() == x.stride() and _dense(grad) and grad.numel():
        fn = _zero_unless_positive_in_place
        _run(fn.__name__, fn, _flat_alias(grad), _flat_alias(x))
        if compiled_kernels_enabled():  # else compiling failed, grad untouched
            torch.autograd.graph.increment_version(grad)
            return grad
    return torch.where(x > 0, grad, 0.0)
