"""Export a train.py checkpoint: ``python -m lightning_qat.export <ckpt> --format onnx|integer``.

The run's ``config_resolved.yaml`` (next to ``checkpoints/``) rebuilds the model; the
checkpoint's QAT state converts and loads it. ``--format onnx`` (the default) writes
the int8 QDQ model for onnxruntime (`to_onnx`); ``--format integer`` the integer-only
reference model (`to_integer`) with ``torch.save``. ``--evaluate`` measures the export's
test accuracy and its top-1 agreement with the fake-quant model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_qat.checkpoint import restore_qat_checkpoint
from lightning_qat.export.integer import to_integer
from lightning_qat.export.onnx_export import to_onnx
from lightning_qat.export.runtime import OnnxRuntimeModel, evaluate_deployment

FORMATS = ("onnx", "integer")
SUFFIXES = {"onnx": ".int8.onnx", "integer": ".integer.pt"}


def _run_config(ckpt: Path):
    for directory in (ckpt.parent, *ckpt.parents):
        candidate = directory / "config_resolved.yaml"
        if candidate.exists():
            return OmegaConf.load(candidate)
    raise FileNotFoundError(
        f"no config_resolved.yaml above {ckpt}: export needs the train.py run directory "
        "the checkpoint came from"
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_qat.export",
        description="Export a train.py checkpoint: the int8 ONNX model for onnxruntime "
        "(onnx) or the integer-only reference (integer).",
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of a train.py run")
    parser.add_argument(
        "--format", choices=FORMATS, default="onnx", help="what to write (default: onnx)"
    )
    parser.add_argument("--out", type=Path, help="output file (default: next to the checkpoint)")
    parser.add_argument(
        "--quantize-input",
        action="store_true",
        help="onnx: quantize the first layer's input even where training left it float",
    )
    parser.add_argument("--evaluate", action="store_true", help="test accuracy of the export")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint at {args.checkpoint}")
    cfg = _run_config(args.checkpoint)
    # the same construction as train.py (imported here: the app layer sits above export)
    from lightning_qat.app.experiment import build_module

    module = restore_qat_checkpoint(build_module(cfg), args.checkpoint).eval()
    datamodule = instantiate(cfg.data)
    out = args.out or args.checkpoint.with_suffix(SUFFIXES[args.format])
    if args.format == "onnx":
        size = datamodule.image_size
        example = torch.zeros(1, datamodule.in_channels, size, size)
        to_onnx(module.model, out, example, quantize_input=args.quantize_input or None)
        deployed = OnnxRuntimeModel(out)
    else:
        deployed = to_integer(module.model)
        torch.save(deployed, out)
    print(f"{args.format} model: {out}")
    if args.evaluate:
        datamodule.prepare_data()
        datamodule.setup("test")
        result = evaluate_deployment(deployed, module, datamodule.test_dataloader(), "export")
        print(
            f"test accuracy {100 * result['export_test_acc']:.2f}% on "
            f"{result['export_test_images']} images; top-1 equal to the fake-quant model on "
            f"{100 * result['export_agreement']:.2f}%; {result['export_seconds']:.1f} s in the "
            "exported model"
        )
    return out


if __name__ == "__main__":
    main()
