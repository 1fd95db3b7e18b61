"""Accuracy on training images a run never saw: choose settings without the test set
(issue 12 experiments; not part of the library).

The budget protocols train on a fixed class-balanced subset of the training split
(``data.train_subset``, 10k of CIFAR-10's 50k images) and report the test set. Choosing
among settings (weight decay, damping, distillation) by their test accuracy selects on the
figure that is then reported. The remaining training images were never trained on: this
script scores each run's last checkpoint on a class-balanced draw of them (``--images``,
drawn with ``subset_seed + 2``, so it is the same draw for every run of one data config),
as the run's test was scored (the model in eval mode, fake-quantized, no augmentation).
Settings are then compared on this held-out accuracy and the test set is read once.

    python scripts/heldout_accuracy.py RUN_DIR [RUN_DIR ...] [--images 10000]

One line per run (held-out and test accuracy), then the mean per setting: runs whose
directory names differ only in a ``_seedN`` suffix are one setting.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def heldout_indices(
    labels: torch.Tensor, trained: torch.Tensor, seed: int, size: int
) -> torch.Tensor:
    """Indices into the training split of ``size`` class-balanced images (drawn with
    ``seed``) outside ``trained``, the indices a data module trains on (its
    ``train_indices``)."""
    from lightning_qat.app.data.tensor_images import balanced_subset

    seen = torch.zeros(len(labels), dtype=torch.bool)
    seen[trained] = True
    unseen = (~seen).nonzero().flatten()
    return unseen[balanced_subset(labels[unseen], size, seed)]


def last_checkpoint(run: Path) -> Path:
    checkpoints = sorted((run / "checkpoints").glob("latest-epoch*.ckpt"))
    if not checkpoints:
        raise FileNotFoundError(f"{run}: no checkpoints/latest-epoch*.ckpt")
    return checkpoints[-1]


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode over ``loader``."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100 * correct / total


def score_run(run: Path, images: int, with_test: bool = False) -> dict[str, float | None]:
    """Held-out accuracy (%) of ``run``'s last checkpoint, its recorded test accuracy
    (results.json) and, with ``with_test``, the test accuracy computed here."""
    from hydra.utils import instantiate

    from lightning_qat.app.experiment import build_module
    from lightning_qat.app.export_cli import _run_config
    from lightning_qat.checkpoint import restore_qat_checkpoint

    checkpoint = last_checkpoint(run)
    cfg = _run_config(checkpoint)
    if cfg.data.get("val_size"):
        raise ValueError(f"{run}: val_size is set; validate on its held-out split instead")
    if not cfg.data.get("train_subset"):
        raise ValueError(f"{run}: trained on the whole training split, no image is unseen")
    module = restore_qat_checkpoint(build_module(cfg), checkpoint)
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    train_images, train_labels = data.load("train")
    held = heldout_indices(train_labels, data.train_indices, data.subset_seed + 2, images)
    heldout = data._dataset(train_images[held], train_labels[held], train=False)
    result: dict[str, float | None] = {
        "heldout_acc": accuracy(module, DataLoader(heldout, batch_size=500))
    }
    recorded = run / "results.json"
    result["test_acc"] = (
        100 * json.loads(recorded.read_text())["test_acc"] if recorded.exists() else None
    )
    if with_test:
        test_images, test_labels = data.load("test")
        test = data._dataset(test_images, test_labels, train=False)
        result["test_acc_here"] = accuracy(module, DataLoader(test, batch_size=500))
    return result


def setting(run: Path) -> str:
    return re.sub(r"_seed\d+$", "", run.name)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train.py run directories")
    parser.add_argument("--images", type=int, default=10000, help="held-out images to score")
    parser.add_argument(
        "--with-test", action="store_true", help="also compute the test accuracy here"
    )
    args = parser.parse_args(argv)
    by_setting: dict[str, list[dict]] = defaultdict(list)
    print("| run | held-out acc (%) | test acc (%) |\n|---|---:|---:|")
    for run in dict.fromkeys(args.runs):  # a run named twice (overlapping globs) counts once
        scores = score_run(run, args.images, args.with_test)
        by_setting[setting(run)].append(scores)
        test = scores["test_acc_here"] if args.with_test else scores["test_acc"]
        print(f"| {run} | {scores['heldout_acc']:.2f} | {'-' if test is None else f'{test:.2f}'} |")
    print("\n| setting | runs | held-out mean (%) | test mean (%) |\n|---|---:|---:|---:|")
    for name, runs in sorted(by_setting.items(), key=lambda kv: -_mean(kv[1], "heldout_acc")):
        test = _mean(runs, "test_acc")
        print(
            f"| {name} | {len(runs)} | {_mean(runs, 'heldout_acc'):.2f} | "
            f"{'-' if test != test else f'{test:.2f}'} |"
        )


def _mean(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    main(sys.argv[1:])
