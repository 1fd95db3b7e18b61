"""End-to-end demo of the numerics on scikit-learn's bundled digits (no download).

FP32 training, then conversion with `prepare_qat`, QAT fine-tuning, BN freeze and observer
freeze, in plain PyTorch: the steps `QuantizationAwareTraining` schedules for Lightning.

    python examples/digits_qat.py [--weight-bits 4] [--asymmetric] [--unfolded]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lightning_qat import QuantConfig, QuantConvBn2d, prepare_qat, quantizers
from lightning_qat.app.models import LeNet


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """8x8 digit images scaled to [0, 1], a stratified 80/20 split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def train_epoch(model, optimizer, x, y, batch_size=64):
    model.train()
    for idx in torch.randperm(len(x)).split(batch_size):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--activation-bits", type=int, default=8)
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--unfolded", action="store_true", help="keep BatchNorm in float")
    parser.add_argument("--fp32-epochs", type=int, default=8)
    parser.add_argument("--qat-epochs", type=int, default=4)
    args = parser.parse_args(argv)
    config = QuantConfig(
        weight_bits=args.weight_bits,
        activation_bits=args.activation_bits,
        symmetric=not args.asymmetric,
        bn_fold=not args.unfolded,
    )
    console = Console()
    torch.manual_seed(0)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = digits_tensors()
    model = LeNet(image_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(args.fp32_epochs):
        train_epoch(model, optimizer, x_train, y_train)
    fp32 = accuracy(model, x_test, y_test)

    prepare_qat(model, config)  # same Parameters: the optimizer and its momentum carry on
    for group in optimizer.param_groups:
        group["lr"] = 0.005
    results = {"fp32": fp32}
    for epoch in range(args.qat_epochs):
        if epoch == args.qat_epochs - 2:  # freeze BN statistics: folded layers use running stats
            for layer in model.modules():
                if isinstance(layer, QuantConvBn2d):
                    layer.freeze_bn()
        if epoch == args.qat_epochs - 1:  # freeze scales and zero points
            for _, quantizer in quantizers(model):
                quantizer.enable_observer(False)
        train_epoch(model, optimizer, x_train, y_train)
    results["qat"] = accuracy(model, x_test, y_test)

    table = Table(
        title=f"digits, LeNet, W{config.weight_bits}A{config.activation_bits} "
        f"{'symmetric' if config.symmetric else 'asymmetric'}, "
        f"BN {'folded' if config.bn_fold else 'unfolded'}"
    )
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_row("FP32", f"{fp32:.4f}")
    table.add_row("QAT (fake-quant)", f"{results['qat']:.4f}")
    console.print(table)
    console.print(
        f"{len(x_train)} train / {len(x_test)} test images, {time.perf_counter() - start:.1f} s"
    )
    return results


if __name__ == "__main__":
    main()
