"""Inference latency and size: PyTorch FP32 against int8 runtimes, per model, in one run.

    python bench/int8_inference.py                       # NIN, ResNet-20, resnet18; batch 1, 128
    python bench/int8_inference.py --models resnet20     # one model
    python bench/int8_inference.py --quick               # tiny NIN and ResNet-8: a smoke run
    python bench/int8_inference.py --models vit_tiny --batch-sizes 64   # the zoo's ViT

Models: NIN (DESIGN.md widths), ResNet-20, torchvision's resnet18 and the zoo's ViT-tiny
(issue 14) at 32x32 inputs. Rows,
each timed at every batch size and given as a ratio to PyTorch FP32 eager (the faster of
contiguous and channels_last memory, chosen per batch size) and to onnxruntime FP32:

- PyTorch FP32 eager; onnxruntime FP32 (the float model through torch.onnx.export);
- ours: `lightning_qat.export.to_onnx` of a QAT model in onnxruntime, symmetric and
  asymmetric (first input quantized: integer-only), and symmetric with the first layer's
  input left float (the reference implementation's training choice), all with the
  default weights (exact on every CPU); and symmetric with int8 weights forced
  (``weight_dtype="int8"``: faster, exact only on CPUs with VNNI or ARM);
- onnxruntime's own static quantizer on the same float graph (QDQ, uint8 activations,
  int8 per-channel weights: its fastest form on x86; it computes int16 pair sums that
  can saturate on CPUs without VNNI, which ours avoids), after its pre-processing;
- torch.ao's converted int8 model (x86 backend; eager mode for the Sequential NIN, FX
  graph mode for the residual models) where torch still ships it.

Speed does not depend on what the weights are, so the QAT models have their activation
ranges observed on a few random batches rather than trained.

Each variant runs in its own process, as a user runs one model per process: in one
process, the runtimes' idle threads (onnxruntime's spinning intra-op pools, one per
session, and torch's OpenMP workers) keep spinning after a call and steal the cores from
the variant timed next (README, "Inference speed and size"). The parent exports every
file once; a child process loads one variant, warms it up and times ``--rounds`` calls
per batch size (median). ``--passes`` such processes per variant are alternated (the
order rotated each pass) so that load on this shared machine hits every variant alike;
the table gives the median over the passes. Sizes: the ONNX files, and torch.save of the
state_dict for the PyTorch rows.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from torch import nn
from torch_ao_baselines import torch_ao_int8, torch_ao_int8_fx

from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.app.models import NIN, NIN_WIDTHS, ResNetCifar, vit_tiny
from lightning_qat.export import OnnxRuntimeModel, to_onnx

Runner = Callable[[np.ndarray], object]
#: int8 weights everywhere (U8S8): onnxruntime's fastest kernels, exact on CPUs with VNNI
#: (and ARM), possibly saturating int16 pair sums on x86 without it (to_onnx's docstring)
OURS_INT8_WEIGHTS = "ours int8 ONNX, symmetric, int8 weights (U8S8)"


def build(name: str, quick: bool) -> nn.Module:
    """A fresh float model: ``nin``, ``resnet20``, ``resnet18`` or ``vit_tiny`` (ResNet-8,
    a tiny NIN or a one-block ViT with ``quick``)."""
    if name == "nin":
        widths = tuple(max(4, w // 16) for w in NIN_WIDTHS) if quick else NIN_WIDTHS
        return NIN(widths=widths)
    if name == "resnet20":
        return ResNetCifar(depth=8 if quick else 20)
    if name == "resnet18":
        return ResNetCifar(depth=8) if quick else torchvision.models.resnet18(num_classes=10)
    if name == "vit_tiny":
        return vit_tiny(width=32, depth=1, heads=2) if quick else vit_tiny()
    raise ValueError(f"unknown model {name!r}: use nin, resnet20, resnet18, vit_tiny")


def observed_qat(name: str, quick: bool, config: QuantConfig, batches: list[torch.Tensor]):
    """The model prepared for QAT, its activation ranges observed on ``batches``."""
    torch.manual_seed(0)
    model = prepare_qat(build(name, quick), config).train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def torch_runner(model: nn.Module, channels_last: bool) -> Runner:
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def run(x: np.ndarray) -> object:
        t = torch.from_numpy(x)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return model(t)

    return run


def export_float_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    return path


def onnxruntime_static_quantization(
    float_path: Path, out: Path, batches: list[torch.Tensor]
) -> Path | None:
    """onnxruntime's quantize_static (QDQ, QUInt8 activations, QInt8 per-channel weights)
    after its pre-processing; None if the quantization tools are missing."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        return None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": x.numpy()} for x in batches])

        def get_next(self):
            return next(self.items, None)

    pre = out.with_name("preprocessed.onnx")
    try:
        quant_pre_process(str(float_path), str(pre))
    except Exception as error:  # its symbolic shape inference fails on some graphs (ViT)
        print(f"onnxruntime's pre-processing failed ({type(error).__name__}): quantizing without")
        pre = float_path
    try:
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    except Exception as error:
        print(f"onnxruntime's quantize_static failed ({type(error).__name__}: {error}), skipped")
        return None
    return out


def state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def time_calls(run: Runner, x: np.ndarray, rounds: int, warmup: int) -> float:
    """The median of ``rounds`` timed calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


ORT_STATIC = "onnxruntime quantize_static (QDQ u8s8)"
TORCH_AO = "torch.ao int8 (x86)"


EAGER = "PyTorch FP32 eager"
ORT_FP32 = "onnxruntime FP32"
#: ours: (symmetric, quantize_input, weight_dtype)
OURS = {
    "ours int8 ONNX, symmetric": (True, True, "auto"),
    "ours int8 ONNX, asymmetric": (False, True, "auto"),
    "ours int8 ONNX, symmetric, float first input": (True, None, "auto"),
    OURS_INT8_WEIGHTS: (True, True, "int8"),
}


def float_model_and_batches(name: str, quick: bool) -> tuple[nn.Module, list[torch.Tensor]]:
    """The float model (BN statistics other than the identity, as after training) and the
    calibration batches, the same in every process (seeded)."""
    torch.manual_seed(0)
    calibration = [torch.randn(16, 3, 32, 32) for _ in range(4)]
    float_model = build(name, quick).eval()
    with torch.no_grad():
        float_model.train()
        for x in calibration:
            float_model(x)
        float_model.eval()
    return float_model, calibration


def torch_ao_model(name: str, quick: bool) -> nn.Module | None:
    float_model, calibration = float_model_and_batches(name, quick)
    fresh = build(name, quick).eval()
    fresh.load_state_dict(float_model.state_dict())
    convert = torch_ao_int8 if isinstance(fresh, nn.Sequential) else torch_ao_int8_fx
    return convert(fresh, calibration)


def export_variants(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, dict]:
    """Every variant of one model: ``{label: {"onnx": path} | {"torch": kind}, "size":
    bytes}``, the ONNX files written to ``workdir``."""
    float_model, calibration = float_model_and_batches(name, args.quick)
    example = calibration[0][:1]
    variants: dict[str, dict] = {EAGER: {"torch": "eager", "size": state_dict_bytes(float_model)}}
    float_onnx = export_float_onnx(float_model, workdir / f"{name}_fp32.onnx", example)
    variants[ORT_FP32] = {"onnx": str(float_onnx), "size": float_onnx.stat().st_size}
    for label, (symmetric, quantize_input, weights) in OURS.items():
        config = QuantConfig(symmetric=symmetric, quantize_first_input=bool(quantize_input))
        model = observed_qat(name, args.quick, config, calibration)
        path = workdir / f"{name}_{len(variants)}.onnx"
        path = to_onnx(model, path, example, quantize_input, weight_dtype=weights)
        variants[label] = {"onnx": str(path), "size": path.stat().st_size}
    ort_static = onnxruntime_static_quantization(
        float_onnx, workdir / f"{name}_ort.onnx", calibration
    )
    if ort_static is not None:
        variants[ORT_STATIC] = {"onnx": str(ort_static), "size": ort_static.stat().st_size}
    ao_model = torch_ao_model(name, args.quick)
    if ao_model is not None:
        variants[TORCH_AO] = {"torch": "ao", "size": state_dict_bytes(ao_model)}
    else:
        print(f"torch.ao: not shipped by torch {torch.__version__}, skipped")
    return variants


def inputs(batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)


def time_variant(name: str, variant: dict, args: argparse.Namespace) -> dict[str, list]:
    """In this process: ``{batch: [seconds, layout]}`` of one variant (the eager model in
    the faster of its two memory layouts, per batch size)."""
    torch.set_num_threads(args.threads)
    if "onnx" in variant:
        runners = {"": OnnxRuntimeModel(variant["onnx"], args.threads).run}
    elif variant["torch"] == "eager":
        model = float_model_and_batches(name, args.quick)[0]
        runners = {
            "contiguous": torch_runner(model, channels_last=False),
            "channels_last": torch_runner(copy.deepcopy(model), channels_last=True),
        }
    else:
        runners = {"": torch_runner(torch_ao_model(name, args.quick), channels_last=True)}
    timed = {}
    for batch in args.batch_sizes:
        x = inputs(batch)
        layouts = {k: time_calls(run, x, args.rounds, args.warmup) for k, run in runners.items()}
        best = min(layouts, key=layouts.get)
        timed[str(batch)] = [layouts[best], best]
    return timed


def time_in_child(name: str, variant: dict, args: argparse.Namespace) -> dict[str, list]:
    """`time_variant` in a fresh process."""
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        json.dumps(variant),
        "--batch-sizes",
        *map(str, args.batch_sizes),
        "--rounds",
        str(args.rounds),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        *(["--quick"] if args.quick else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"timing {name} {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["nin", "resnet20", "resnet18"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--rounds", type=int, default=9, help="timed calls per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per process")
    parser.add_argument("--passes", type=int, default=3, help="processes per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # MODEL VARIANT_JSON
    args = parser.parse_args(argv)
    if args.child:
        name, variant = args.child
        print(json.dumps(time_variant(name, json.loads(variant), args)))
        return {}
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="int8_inference_"))
    print(
        f"{args.threads} threads, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"one process per variant, median of {args.passes} processes x {args.rounds} calls"
    )
    results: dict[str, dict[str, float]] = {}
    for name in args.models:
        variants = export_variants(name, args, workdir)
        labels = list(variants)
        runs: dict[str, list[dict[str, list]]] = {label: [] for label in labels}
        for index in range(args.passes):
            shift = index % len(labels)  # each variant first in some pass
            for label in labels[shift:] + labels[:shift]:
                runs[label].append(time_in_child(name, variants[label], args))
        for batch in map(str, args.batch_sizes):
            timed = {
                label: statistics.median(run[batch][0] for run in runs[label]) for label in labels
            }
            layouts = [run[batch][1] for run in runs[EAGER]]
            layout = max(set(layouts), key=layouts.count)
            results[f"{name}, batch {batch}"] = timed
            print(f"\n{name} inference, batch {batch} (PyTorch FP32 eager: {layout}, the faster)")
            print(
                "| variant | latency (ms) | vs PyTorch FP32 | vs onnxruntime FP32 "
                "| size (KB) | smaller |"
            )
            print("|---|---:|---:|---:|---:|---:|")
            base, ort_fp32 = timed[EAGER], timed[ORT_FP32]
            base_size = variants[EAGER]["size"]
            for label, seconds in timed.items():
                size = variants[label]["size"]
                print(
                    f"| {label} | {seconds * 1e3:.1f} | {base / seconds:.2f}x "
                    f"| {ort_fp32 / seconds:.2f}x | {size / 1024:.0f} "
                    f"| {base_size / size:.2f}x |"
                )
    return results


if __name__ == "__main__":
    main()
