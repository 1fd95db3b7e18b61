"""Run folders of the app: one per run, never shared, and a resumed run continues in its own.

Registered as OmegaConf resolvers (``register_resolvers``), used by ``conf/config.yaml``:

- ``${lqat.run_dir:<fresh>,${resume}}``: a new run gets ``<fresh>`` (named to the
  second), made here with an exclusive ``mkdir``: a second process started in the same
  second gets ``<fresh>_2`` instead of sharing the folder (they crashed on the CSV logger
  and mixed their configs). A run resumed from ``<run>/checkpoints/<ckpt>`` continues in
  ``<run>``: its metrics, ``best-*`` checkpoints and results stay together.
- ``${lqat.hydra_subdir:${resume},<stamp>}``: Hydra's ``.hydra`` folder, or
  ``.hydra/resumed-<stamp>`` for a resumed run (the original run's config is kept).

`AppendingCSVLogger` continues a resumed run's ``csv/metrics.csv`` where the checkpoint
left it (Lightning's CSVLogger deletes an existing file), after `truncate_metrics` has
dropped the rows that the crashed run logged after its checkpoint.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import OmegaConf

_made: dict[str, str] = {}  # one folder per process, however often Hydra resolves


def resumed_run_dir(resume: str | None) -> Path | None:
    """The app run folder a checkpoint belongs to (``<run>/checkpoints/<file>``), if any."""
    if not resume:
        return None
    checkpoint = Path(resume)
    run = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (run / "config_resolved.yaml").is_file():
        return run
    return None


def run_dir(fresh: str, resume: str | None = None) -> str:
    """The folder of this run: the resumed run's own, or a new one no other run has."""
    resumed = resumed_run_dir(resume)
    if resumed is not None:
        return str(resumed)
    if fresh not in _made:
        candidate, suffix = Path(fresh), 1
        candidate.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                candidate.mkdir()  # exclusive: exactly one process creates a folder
                break
            except FileExistsError:
                suffix += 1
                candidate = Path(f"{fresh}_{suffix}")
        _made[fresh] = str(candidate)
    return _made[fresh]


def hydra_subdir(resume: str | None, stamp: str) -> str:
    return ".hydra" if resumed_run_dir(resume) is None else f".hydra/resumed-{stamp}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("lqat.run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("lqat.hydra_subdir", hydra_subdir, replace=True)


def truncate_metrics(path: str | Path, before_step: int) -> int:
    """Drop the rows of a metrics CSV logged at ``step >= before_step`` (what a crashed
    run logged after the checkpoint it resumes from; they are logged again). Returns the
    number of rows kept. Written to a temporary file and renamed: a crash now loses
    nothing."""
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        fields = reader.fieldnames or []
        rows = [row for row in reader if row.get("step") and int(row["step"]) < before_step]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return len(rows)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing metrics.csv is continued, not deleted."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                # the file's columns: new keys then rewrite the header, old rows kept
                self.metrics_keys = next(csv.reader(file), [])

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's deletes metrics.csv here


class AppendingCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that appends to the run's existing
    ``metrics.csv`` (a resumed run) instead of deleting it; a new run is unchanged."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
