"""Export a train.py checkpoint: ``python -m lightning_qat.export <ckpt> --format integer``.

The run's ``config_resolved.yaml`` (next to ``checkpoints/``) rebuilds the model; the
checkpoint's QAT state converts and loads it. ``--format integer`` writes the
integer-only model (`to_integer`) with ``torch.save`` and, with ``--evaluate``, its test
accuracy and top-1 agreement with the fake-quant model. (ONNX is the next format.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_qat.checkpoint import restore_qat_checkpoint
from lightning_qat.export.integer import evaluate_integer, to_integer

FORMATS = ("integer",)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--format", choices=FORMATS, default="integer")
    parser.add_argument("--out", type=Path, help="output file (default: next to the checkpoint)")
    parser.add_argument("--evaluate", action="store_true", help="test accuracy of the export")
    args = parser.parse_args(argv)
    cfg = _run_config(args.checkpoint)
    # the same construction as train.py (imported here: the app layer sits above export)
    from lightning_qat.experiment import build_module

    module = restore_qat_checkpoint(build_module(cfg), args.checkpoint)
    integer = to_integer(module.model)
    out = args.out or args.checkpoint.with_suffix(".integer.pt")
    torch.save(integer, out)
    print(f"integer-only model: {out}")
    if args.evaluate:
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("test")
        result = evaluate_integer(integer, module, datamodule.test_dataloader())
        print(
            f"test accuracy {100 * result['integer_test_acc']:.2f}% on "
            f"{result['integer_test_images']} images; top-1 equal to the fake-quant model on "
            f"{100 * result['integer_agreement']:.2f}%"
        )
    return out


if __name__ == "__main__":
    main()
