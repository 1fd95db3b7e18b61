"""Per-epoch training loss and validation accuracy of runs, averaged per setting: where
two settings part (issue 12 experiments; not part of the library).

Reads each run's CSV log (``RUN_DIR/csv/metrics.csv``: ``train_loss_epoch`` and
``val_acc`` by epoch, as the app logs them); runs whose directory names differ only in a
``_seedN`` suffix are one setting. Prints one markdown table per metric, a column per
epoch (the mean over the setting's seeds, then the seeds' values), and with ``--plot
FILE`` draws both metrics against the epoch, one line per setting.

    python scripts/epoch_curves.py RUN_DIR [RUN_DIR ...] [--plot curves.png]
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

METRICS = ("train_loss_epoch", "val_acc")


def read_run(run: Path) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` from a run's CSV log (the last value of an epoch)."""
    values: dict[str, dict[int, float]] = {m: {} for m in METRICS}
    with open(run / "csv" / "metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            if not row.get("epoch"):
                continue
            for metric in METRICS:
                if row.get(metric):
                    values[metric][int(row["epoch"])] = float(row[metric])
    return values


def setting_of(run: Path) -> str:
    return re.sub(r"_seed\d+$", "", run.name)


def by_setting(runs: list[Path]) -> dict[str, list[dict[str, dict[int, float]]]]:
    settings: dict[str, list[dict[str, dict[int, float]]]] = defaultdict(list)
    for run in runs:
        settings[setting_of(run)].append(read_run(run))
    return settings


def table(settings: dict[str, list[dict[str, dict[int, float]]]], metric: str) -> str:
    """A markdown table: a row per setting, a column per epoch, ``mean (seed, ...)``."""
    epochs = sorted({e for runs in settings.values() for r in runs for e in r[metric]})
    lines = [
        f"| {metric} | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
        "|---|" + "---:|" * len(epochs),
    ]
    for name, runs in settings.items():
        cells = []
        for epoch in epochs:
            seen = [r[metric][epoch] for r in runs if epoch in r[metric]]
            if not seen:
                cells.append("-")
                continue
            mean = sum(seen) / len(seen)
            cells.append(f"{mean:.4f} ({', '.join(f'{v:.4f}' for v in seen)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(settings: dict[str, list[dict[str, dict[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 4))
    for axis, metric in zip(axes, METRICS, strict=True):
        for name, runs in settings.items():
            epochs = sorted({e for r in runs for e in r[metric]})
            means = [
                sum(r[metric][e] for r in runs if e in r[metric])
                / sum(e in r[metric] for r in runs)
                for e in epochs
            ]
            axis.plot(epochs, means, marker="o", label=name)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path, default=None, help="write a plot to this file")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "csv" / "metrics.csv").is_file()]
    if missing:
        sys.exit(f"no csv/metrics.csv in: {', '.join(missing)}")
    settings = by_setting(args.runs)
    for metric in METRICS:
        print(table(settings, metric), end="\n\n")
    if args.plot is not None:
        plot(settings, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
