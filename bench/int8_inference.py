"""Inference latency and size of NIN: PyTorch FP32 against int8 runtimes, in one run.

    python bench/int8_inference.py            # NIN, batch 1 and 128, 2 threads
    python bench/int8_inference.py --quick    # tiny NIN: a smoke run

Rows, each timed at batch 1 and batch 128 and given as a ratio to PyTorch FP32 eager
(the faster of contiguous and channels_last memory, chosen per batch size):

- PyTorch FP32 eager; onnxruntime FP32 (the float model through torch.onnx.export);
- ours: `lightning_qat.export.to_onnx` of a QAT model in onnxruntime, for symmetric and
  asymmetric quantization (symmetric int8 weights have zero point 0, asymmetric ones a
  zero point per channel: different kernels), the first layer's input quantized
  (integer-only) and, as the reference implementation trains NIN, left float;
- onnxruntime's own static quantizer (QDQ, int8 activations and weights, per-channel,
  after its pre-processing that folds BN), as a reference point;
- torch.ao's converted int8 model (eager mode, x86 backend) where torch still ships it.

Speed does not depend on what the weights are, so the QAT models are NIN with activation
ranges observed on a few random batches rather than trained ones. The variants are timed
round-robin (one call of each per round) so that load on this shared machine hits them
alike; the median per variant is reported. Sizes: the ONNX files, and torch.save of
the state_dict for the PyTorch rows.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch_ao_baselines import torch_ao_int8

from lightning_qat import QuantConfig, prepare_qat
from lightning_qat.export import OnnxRuntimeModel, to_onnx
from lightning_qat.models import NIN, NIN_WIDTHS

Runner = Callable[[np.ndarray], object]


def observed_qat_nin(widths, config: QuantConfig, batches: list[torch.Tensor]) -> nn.Module:
    """A NIN prepared for QAT whose activation ranges have seen ``batches``."""
    torch.manual_seed(0)
    model = prepare_qat(NIN(widths=widths), config).train()
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
    """onnxruntime's quantize_static (QDQ, QInt8 activations and weights, per channel)
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
    quant_pre_process(str(float_path), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return out


def state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def time_round_robin(
    runners: dict[str, Runner], x: np.ndarray, rounds: int, warmup: int
) -> dict[str, float]:
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--rounds", type=int, default=9, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny NIN (smoke test)")
    args = parser.parse_args(argv)
    widths = tuple(max(4, w // 16) for w in NIN_WIDTHS) if args.quick else NIN_WIDTHS
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    calibration = [torch.randn(16, 3, 32, 32) for _ in range(4)]
    float_model = NIN(widths=widths).eval()
    with torch.no_grad():  # BN statistics other than the identity, as after training
        float_model.train()
        for x in calibration:
            float_model(x)
        float_model.eval()

    workdir = Path(tempfile.mkdtemp(prefix="int8_inference_"))
    example = calibration[0][:1]
    sizes: dict[str, int] = {}
    runners: dict[str, Runner] = {}
    eager = {
        "contiguous": torch_runner(float_model, channels_last=False),
        "channels_last": torch_runner(float_model, channels_last=True),
    }
    sizes["PyTorch FP32 eager"] = state_dict_bytes(float_model)

    float_onnx = export_float_onnx(float_model, workdir / "fp32.onnx", example)
    runners["onnxruntime FP32"] = OnnxRuntimeModel(float_onnx, args.threads).run
    sizes["onnxruntime FP32"] = float_onnx.stat().st_size

    ours = {
        "ours int8 ONNX, symmetric": (True, True),
        "ours int8 ONNX, asymmetric": (False, True),
        "ours int8 ONNX, symmetric, float first input": (True, None),
    }
    for name, (symmetric, quantize_input) in ours.items():
        config = QuantConfig(symmetric=symmetric, quantize_first_input=bool(quantize_input))
        model = observed_qat_nin(widths, config, calibration)
        path = to_onnx(model, workdir / f"{len(runners)}.onnx", example, quantize_input)
        runners[name] = OnnxRuntimeModel(path, args.threads).run
        sizes[name] = path.stat().st_size

    ort_static = onnxruntime_static_quantization(float_onnx, workdir / "ort.onnx", calibration)
    if ort_static is not None:
        name = "onnxruntime quantize_static (QDQ s8s8)"
        runners[name] = OnnxRuntimeModel(ort_static, args.threads).run
        sizes[name] = ort_static.stat().st_size

    ao_model = torch_ao_int8(NIN(widths=widths).eval(), calibration)
    if ao_model is not None:
        runners["torch.ao int8 (x86)"] = torch_runner(ao_model, channels_last=True)
        sizes["torch.ao int8 (x86)"] = state_dict_bytes(ao_model)
    else:
        print(f"torch.ao: not shipped by torch {torch.__version__}, skipped")

    results: dict[str, dict[str, float]] = {}
    for batch in args.batch_sizes:
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
        layout = time_round_robin(eager, x, args.rounds, args.warmup)
        best = min(layout, key=layout.get)
        timed = time_round_robin(
            {"PyTorch FP32 eager": eager[best], **runners}, x, args.rounds, args.warmup
        )
        results[f"batch {batch}"] = timed
        print(
            f"\nNIN inference, batch {batch}, {args.threads} threads, torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}, median of {args.rounds} rounds "
            f"(PyTorch FP32 eager: {best}, the faster layout)"
        )
        print("| variant | latency (ms) | speed-up vs PyTorch FP32 | size (KB) | smaller |")
        print("|---|---:|---:|---:|---:|")
        base_time = timed["PyTorch FP32 eager"]
        base_size = sizes["PyTorch FP32 eager"]
        for name, seconds in timed.items():
            print(
                f"| {name} | {seconds * 1e3:.1f} | {base_time / seconds:.2f}x "
                f"| {sizes[name] / 1024:.0f} | {base_size / sizes[name]:.2f}x |"
            )
    return results


if __name__ == "__main__":
    main()
