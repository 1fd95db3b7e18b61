"""Training-step time of NIN with QAT, as a ratio to the FP32 step, measured in one run.

    python bench/qat_overhead.py                 # NIN, batch 128, channels_last, SGD
    python bench/qat_overhead.py --compile       # torch.compile (inductor) of every variant
    python bench/qat_overhead.py --quick         # tiny widths and batch: a smoke run
    python bench/qat_overhead.py --variants "ours sym folded,ours LSQ W4A4"   # these beside FP32
    python bench/qat_overhead.py --device cuda --batch-size 256 [--bf16] [--compile]   # a GPU

Variants: FP32; lightning-qat W8A8 symmetric/asymmetric x folded/unfolded BN (and
symmetric folded with its ReLUs kept plain instead of joined to their quantizers), and W4A4
with learned step sizes (LSQ, `QuantConfig(learn_scale=True)`, folded BN); torch.ao
eager QAT (fused ConvBnReLU2d, default fbgemm QAT qconfig) where torch still ships it.
Each variant is timed in fresh processes of its own, as a user runs one model per process
(two models in one process share an allocator and distort each other's step); the
processes alternate between the variants (``--passes`` of each) so that load on this
shared machine hits them alike, and the median step over all of a variant's timed steps
is reported.

Memory: each variant also runs alone in a fresh process (two models in one process would
share an allocator and hide each other's peaks), with two figures as ratios to FP32's:
the tensors live at the step's peak (torch's profiler adds up every allocation and free
of one step: the allocator's habits do not enter it, as CUDA's ``max_memory_allocated``
on a GPU), and the process's resident peak over ``--memory-steps`` steps above its state
after a first step (on a GPU: the most the caching allocator reserved in the steps, from
before the model was made, since it keeps what the first step reserved). That first step
is a one-time cost, reported in a column of its own: it compiles the CPU fake-quant pass
(or, with ``--compile``, the model), whose code, imports and transient peak are not the
step's. Eager processes take it at batch 2, so
the measured steps start from a heap that large activations have not shaped.

``--compile`` compiles each model with ``torch.compile`` (inductor) first and compares
compiled QAT with compiled FP32 (torch.ao's eager QAT is left out there).

Allocator: glibc hands out tensors above 32 MB (NIN's activations at batch 128 are
80 MB) as fresh mmaps and zero-fills their pages on first touch, every step; that cost
grows with the number of large tensors, not with the arithmetic. ``--malloc both`` (the
default) times the variants under the system setting and again with glibc told to
reuse memory (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``, a setting any user can
export), each in a fresh process, and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch_ao_baselines import torch_ao_qat

from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.app.models import NIN, NIN_WIDTHS
from lightning_qat.nn import ReLUBeforeQuantizer

#: Learned step sizes at 4 bits as the low-bit recipes use them (conf/quant/w4a4_lsq.yaml).
LSQ_W4A4 = QuantConfig(
    weight_bits=4,
    activation_bits=4,
    activation_symmetric=False,
    learn_scale=True,
    layer_bits={"@first": 8, "@last": 8},
)


def variants(widths: tuple[int, ...]) -> dict[str, Callable[[], nn.Module]]:
    def ours(symmetric: bool, bn_fold: bool) -> Callable[[], nn.Module]:
        return lambda: prepare_qat(
            NIN(widths=widths), QuantConfig(symmetric=symmetric, bn_fold=bn_fold)
        )

    return {
        "FP32": lambda: NIN(widths=widths),
        "ours sym folded": ours(True, True),
        "ours sym folded, plain ReLUs": lambda: plain_relus(ours(True, True)()),
        "ours sym unfolded": ours(True, False),
        "ours asym folded": ours(False, True),
        "ours asym unfolded": ours(False, False),
        "ours LSQ W4A4": lambda: prepare_qat(NIN(widths=widths), LSQ_W4A4),
        "torch.ao eager QAT": lambda: torch_ao_qat(NIN(widths=widths)),
    }


def plain_relus(model: nn.Module) -> nn.Module:
    """``model`` with its `ReLUBeforeQuantizer`s back to plain ReLUs (each keeping its
    float output for its own backward), as `prepare_qat` left them before it joined
    them to their quantizers: what the joining saves, measured side by side."""
    for module in model.modules():
        if isinstance(module, ReLUBeforeQuantizer):
            module.reader.input_after_relu = False
            del module.__dict__["reader"]
            module.__class__ = nn.ReLU
    return model


def make_step(
    model: nn.Module,
    batch_size: int,
    compile: bool = False,
    options: dict | None = None,
    device: str = "cpu",
    bf16: bool = False,
    foreach: bool | None = None,
) -> Callable[[], None]:
    """One SGD step of ``model`` on a fixed random batch, on ``device``; ``bf16``: the
    forward under ``torch.autocast`` in bfloat16 (Lightning's ``precision="bf16-mixed"``).
    On a GPU the step waits for the device, so that the wall clock times the step.
    ``foreach``: SGD's multi-tensor form (``None``: torch's choice, on for CUDA tensors
    only)."""
    model = model.to(device).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=foreach)
    if compile:
        model = torch.compile(model, options=options)
    x = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    device_type = torch.device(device).type
    synchronize = torch.cuda.synchronize if device_type == "cuda" else lambda: None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        synchronize()

    return step


#: glibc settings that keep freed memory for reuse instead of returning it to the OS.
REUSE_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per process")
    # Four: a QAT process needs two to four steps before its steps settle (the first
    # compiles the CPU fake-quant pass; with glibc reusing memory, the heap grows over the
    # next ones), FP32 one to two.
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per process")
    parser.add_argument(
        "--passes", type=int, default=3, help="fresh processes per variant, alternated"
    )
    parser.add_argument("--quick", action="store_true", help="tiny NIN and batch (smoke test)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument(
        "--compile-options",
        type=json.loads,
        help="inductor options for every variant's torch.compile, as JSON "
        "(e.g. '{\"realize_reads_threshold\": 8}')",
    )
    parser.add_argument(
        "--variants",
        help="comma-separated variant names to run (FP32 always runs: the ratios' base)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for a GPU")
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast, as precision='bf16-mixed'"
    )
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of the memory runs")
    parser.add_argument("--memory-only", action="store_true", help="the memory table alone")
    parser.add_argument(
        "--ops",
        action="store_true",
        help="instead of timing: operator calls and host reads per step (what a GPU "
        "step launches and waits for), from torch's profiler",
    )
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # one variant's memory run
    parser.add_argument("--time-of", help=argparse.SUPPRESS)  # one variant's timing run
    parser.add_argument(
        "--malloc",
        choices=["both", "system", "reuse", "current"],
        default="both",
        help="allocator setting(s) to time under, each in a fresh process",
    )
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.peak_of:
        print(*peak_memory(args))
        return
    if args.time_of:
        for row in step_times(args):  # wall seconds, kernel seconds, MB faulted in
            print(" ".join(f"{value:.6f}" for value in row))
        return
    if args.ops:
        ops_table(args)
        return
    if args.malloc == "current":
        if not args.memory_only:
            measure(args, argv if argv is not None else sys.argv[1:])
        memory_table(args, argv if argv is not None else sys.argv[1:])
        return
    settings = ["system", "reuse"] if args.malloc == "both" else [args.malloc]
    rest = _without_malloc(argv if argv is not None else sys.argv[1:])
    for setting in settings:
        env = {k: v for k, v in os.environ.items() if k not in REUSE_MALLOC}
        if setting == "reuse":
            env.update(REUSE_MALLOC)
        label = "glibc malloc, reusing memory" if setting == "reuse" else "system malloc"
        print(f"\n## {label}", flush=True)
        subprocess.run(
            [sys.executable, __file__, *rest, "--malloc", "current"], env=env, check=True
        )


def _compiled(args: argparse.Namespace) -> str:
    if not args.compile:
        return ""
    options = f", options {json.dumps(args.compile_options)}" if args.compile_options else ""
    return f" (torch.compile{options})"


def _setting(args: argparse.Namespace) -> str:
    """The device and precision when they are not the default CPU float32."""
    parts = [f"on {args.device}" if args.device != "cpu" else "", "bf16-mixed" if args.bf16 else ""]
    return "".join(f", {part}" for part in parts if part)


def _without_malloc(argv: list[str]) -> list[str]:
    """The command line less its ``--malloc X`` / ``--malloc=X``."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--malloc":
            skip = True
        elif not arg.startswith("--malloc="):
            rest.append(arg)
    return rest


def _sizes(args: argparse.Namespace) -> tuple[tuple[int, ...], int]:
    widths = tuple(max(4, w // 16) for w in NIN_WIDTHS) if args.quick else NIN_WIDTHS
    return widths, 8 if args.quick else args.batch_size


def _variants(args: argparse.Namespace, widths: tuple[int, ...]) -> dict[str, Callable]:
    found = variants(widths)
    if args.compile:  # torch.ao's eager QAT modules are not what this table compares
        found.pop("torch.ao eager QAT")
    if args.variants:
        chosen = {"FP32", *(name.strip() for name in args.variants.split(","))}
        unknown = chosen - set(found)
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {sorted(found)}")
        found = {name: build for name, build in found.items() if name in chosen}
    return found


def peak_memory(args: argparse.Namespace) -> tuple[int, int, int]:
    """Of one variant (``--peak-of``), in this process alone, in bytes: the tensors live at
    the peak of one training step above those live at its start, the resident peak of
    ``--memory-steps`` steps above the process after its first step, and what that
    first step left resident (the compiled pass's code and imports: a one-time cost).
    Zeros where torch does not ship the variant."""
    widths, batch_size = _sizes(args)
    torch.manual_seed(0)
    model = _variants(args, widths)[args.peak_of]()
    if model is None:
        return 0, 0, 0
    if torch.device(args.device).type == "cuda":
        return cuda_peak_memory(args, model, batch_size)
    before = _status_bytes("VmRSS")
    # The first step compiles (the CPU fake-quant pass; with --compile, the model) and
    # creates the optimizer's momentum: at batch 2 eagerly, so no large activation is
    # interleaved with what compilation leaves on the heap; compiled models take it at
    # the measured batch, as a recompile for the batch size would be a second compile.
    step = make_step(model, batch_size, args.compile, args.compile_options, args.device, args.bf16)
    if args.compile:
        step()
    else:
        make_step(model, min(2, batch_size), device=args.device, bf16=args.bf16)()
    warmed = _status_bytes("VmRSS")
    # Linux resets VmHWM to the current RSS on "5" (proc(5), /proc/pid/clear_refs), so the
    # peak below is the measured steps', not the first step's compilation's.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    for _ in range(args.memory_steps):
        step()
    resident = _status_bytes("VmHWM") - warmed
    return live_tensor_peak(step), resident, warmed - before


def cuda_peak_memory(
    args: argparse.Namespace, model: nn.Module, batch_size: int
) -> tuple[int, int, int]:
    """`peak_memory` on a GPU, from the CUDA caching allocator's counters: the most bytes
    allocated at once in the steps above those allocated before them, the most reserved
    in the steps (the whole training footprint: the caching allocator keeps what the
    first step reserved, so an increase over it is 0 for every variant), and what that
    first step reserved."""
    before = torch.cuda.memory_reserved()
    step = make_step(model, batch_size, args.compile, args.compile_options, args.device, args.bf16)
    step()  # compiles (with --compile) and creates the optimizer's momentum
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.memory_steps):
        step()
    live = torch.cuda.max_memory_allocated() - allocated
    return live, torch.cuda.max_memory_reserved() - before, reserved - before


#: Operators that read a tensor's value on the host: on a GPU each waits for the device.
HOST_READS = ("aten::item", "aten::_local_scalar_dense")

#: Operators that make a view, read metadata or allocate without writing: no kernel on
#: any device, unless one they call does (a ``reshape`` that has to copy calls ``clone``).
NO_KERNEL = frozenset(
    "aten::" + name
    for name in [
        "view",
        "_unsafe_view",
        "reshape",
        "_reshape_alias",
        "view_as",
        "flatten",
        "permute",
        "transpose",
        "t",
        "select",
        "slice",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "as_strided",
        "alias",
        "detach",
        "lift_fresh",
        "to",
        "contiguous",
        "resolve_conj",
        "resolve_neg",
        "empty",
        "empty_like",
        "empty_strided",
    ]
)


def _launches_kernel(event: Any) -> bool:
    if event.name not in NO_KERNEL:
        return True
    # (autograd's own records inside an operator, such as ``detach``'s, are not aten's)
    calls = (c for c in event.cpu_children if c.name.startswith("aten::"))
    return any(_launches_kernel(c) for c in calls)


def operator_calls(step: Callable[[], None]) -> tuple[int, int, int]:
    """``(operators, kernel operators, host reads)`` of one ``step()``: the aten operators
    called from Python or autograd (those not called inside another aten operator), those
    of them that compute anything (on a GPU each launches at least one kernel; views and
    allocations, `NO_KERNEL`, do not), and the host reads (`HOST_READS`) anywhere."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    events = profiler.events()
    outer = [
        e
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]
    kernels = sum(1 for e in outer if _launches_kernel(e))
    return len(outer), kernels, sum(1 for e in events if e.name == HOST_READS[0])


def ops_table(args: argparse.Namespace) -> None:
    """Operator calls and host reads of one training step of each variant, in this
    process, on the CPU with torch's kernels, as on a GPU (the CPU's compiled
    fake-quant pass, which fuses some, is turned off, and SGD takes its multi-tensor
    form, as it does for CUDA tensors; nothing is timed, so one process holds every
    variant). The host reads include one per observer per step that only the CPU makes
    (its non-finite warning; on a GPU the counter is read once an epoch) and the CPU
    per-tensor fake-quant kernel's reads of its parameters (the CUDA kernel reads them on
    the device): a GPU step reads nothing back (symmetric weight grids hand torch's
    per-channel kernel a float zero point, which it does not range-check on the host)."""
    os.environ["LIGHTNING_QAT_COMPILED_KERNELS"] = "0"
    widths, batch_size = _sizes(args)
    print(
        f"\nOperators called in one NIN training step, batch {batch_size}, torch's kernels "
        "and multi-tensor SGD (as on a GPU)"
    )
    print(
        "| variant | aten operators | ratio to FP32 | operators with a kernel | ratio to FP32 "
        "| host reads |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for name, build in _variants(args, widths).items():
        step = make_step(build(), batch_size, bf16=args.bf16, foreach=True)
        step()  # the first step starts learning, makes momentum, compiles kernels
        step()
        operators, kernels, reads = operator_calls(step)
        base = base or (operators, kernels)
        print(
            f"| {name} | {operators} | {operators / base[0]:.2f}x | {kernels} "
            f"| {kernels / base[1]:.2f}x | {reads} |"
        )


def live_tensor_peak(step: Callable[[], None]) -> int:
    """Bytes of tensors live at the peak of one ``step()`` above those live at its start:
    the running sum of the allocations (+) and frees (-) torch's profiler records, in
    time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_table(args: argparse.Namespace, argv: list[str]) -> None:
    widths, _ = _sizes(args)
    rest = _without_malloc(argv)
    peaks: dict[str, list[int]] = {}
    for name in _variants(args, widths):
        out = subprocess.run(
            [sys.executable, __file__, *rest, "--malloc", "current", "--peak-of", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        peaks[name] = [int(value) for value in out.split()[-3:]]
    print(
        f"\nPeak memory of a training step{_setting(args)}, each variant alone in a fresh "
        "process" + (" (CUDA's allocated and reserved)" if args.device != "cpu" else "")
    )
    print(
        "| variant | tensors live at the step's peak (MB) | ratio to FP32 "
        "| resident peak of the steps (MB) | ratio to FP32 "
        "| left resident by the first step, once (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    base_live, base_resident, _ = peaks["FP32"]
    for name, (live, resident, first) in peaks.items():
        if live:
            print(
                f"| {name} | {live / 2**20:.0f} | {_ratio(live, base_live)} "
                f"| {resident / 2**20:.0f} | {_ratio(resident, base_resident)} "
                f"| {first / 2**20:.0f} |"
            )


def _ratio(value: int, base: int) -> str:
    """``value / base`` as ``1.23x``; ``-`` where FP32's figure is 0 (nothing to divide by)."""
    return f"{value / base:.2f}x" if base else "-"


def step_times(args: argparse.Namespace) -> tuple[list[float], list[float], list[float]]:
    """Of each timed step of one variant (``--time-of``), in this process alone: the wall
    seconds, the seconds spent in the kernel (page faults, mostly: zero-filling the pages
    of freshly mapped tensors) and the MB of pages faulted in; empty where torch does not
    ship the variant."""
    widths, batch_size = _sizes(args)
    torch.manual_seed(0)
    model = _variants(args, widths)[args.time_of]()
    if model is None:
        return [], [], []
    step = make_step(model, batch_size, args.compile, args.compile_options, args.device, args.bf16)
    for _ in range(args.warmup):
        step()
    times, kernel, faulted = [], [], []
    page_mb = resource.getpagesize() / 2**20
    for _ in range(args.rounds):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        kernel.append(after.ru_stime - before.ru_stime)
        faulted.append((after.ru_minflt - before.ru_minflt) * page_mb)
    return times, kernel, faulted


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, float]:
    """The table of median steps: ``--passes`` fresh processes per variant, each timing
    ``--rounds`` steps after ``--warmup``, the variants alternating process by process."""
    widths, batch_size = _sizes(args)
    rest = _without_malloc(argv)
    names = list(_variants(args, widths))
    times: dict[str, list[float]] = {name: [] for name in names}
    kernel: dict[str, list[float]] = {name: [] for name in names}
    faulted: dict[str, list[float]] = {name: [] for name in names}
    for process in range(args.passes):
        for name in names:
            out = subprocess.run(
                [sys.executable, __file__, *rest, "--malloc", "current", "--time-of", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows = [[float(value) for value in line.split()] for line in out.splitlines()[-3:]]
            if len(rows) == 3:
                times[name] += rows[0]
                kernel[name] += rows[1]
                faulted[name] += rows[2]
            print(f"  [{process + 1}/{args.passes}] {name}", file=sys.stderr, flush=True)
    skipped = [name for name, t in times.items() if not t]
    for name in skipped:
        print(f"{name}: not shipped by torch {torch.__version__}, skipped")
        del times[name]

    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"NIN training step{_compiled(args)}{_setting(args)}, batch {batch_size}, "
        "channels_last, SGD, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"median of {args.rounds} steps in each of {args.passes} fresh processes per variant"
    )
    # The kernel's share tells page-fault cost from arithmetic: on a shared virtual machine
    # the same pages can cost twice as much from one process to the next.
    print(
        "| variant | step (ms) | ratio to FP32 | in the kernel (ms, min-max of processes) "
        "| pages faulted in (MB) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, seconds in median.items():
        per_process = [
            statistics.median(kernel[name][i : i + args.rounds])
            for i in range(0, len(kernel[name]), args.rounds)
        ]
        print(
            f"| {name} | {seconds * 1e3:.0f} | {seconds / median['FP32']:.2f}x "
            f"| {statistics.median(kernel[name]) * 1e3:.0f} "
            f"({min(per_process) * 1e3:.0f}-{max(per_process) * 1e3:.0f}) "
            f"| {statistics.median(faulted[name]):.0f} |"
        )
    return {name: seconds / median["FP32"] for name, seconds in median.items()}


if __name__ == "__main__":
    main()
