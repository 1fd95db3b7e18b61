"""Tables for whatever loggers a Trainer has: a W&B table, a TensorBoard text panel (a
markdown table), a CSV file beside the CSV logger's metrics. Scalars go through
``log_metrics`` as usual; these are the end-of-run summaries (the quantized layers, the
deployment results) that a person would rather read as a table than as curves.

Key names: W&B and TensorBoard put a metric in the section named by its first
``/``-separated segment, so per-layer statistics are logged as ``qat.<layer>/<stat>``: one
section per layer, next to ``qat/phase``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger


def layer_metric(layer: str, stat: str) -> str:
    """The logged name of a layer's statistic: ``qat.<layer>/<stat>``."""
    return f"qat.{layer}/{stat}"


def log_table(
    loggers: Iterable[Logger],
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    step: int | None = None,
) -> None:
    """Log a table under ``key`` to each logger that can show one. ``None`` is a missing
    cell (a column keeps one type for W&B); it reads ``-`` in the text forms."""
    rows = [list(row) for row in rows]
    text_rows = [["-" if cell is None else cell for cell in row] for row in rows]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=rows, step=step)
        elif isinstance(logger, TensorBoardLogger):
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join("| " + " | ".join(map(str, row)) + " |\n" for row in text_rows)
            logger.experiment.add_text(key, header + body, global_step=step)
        elif isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / f"{key.replace('/', '_')}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(columns)
                writer.writerows(text_rows)
