"""Run folders: unique per process, resumed runs continue their own, metrics.csv kept."""

from pathlib import Path

import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_qat.app import run_folder
from lightning_qat.app.run_folder import (
    AppendingCSVLogger,
    hydra_subdir,
    resumed_run_dir,
    run_dir,
    truncate_metrics,
)


def test_a_folder_name_taken_by_another_process_gets_a_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_dir("outputs/x/2026-12-01_10-00-00")
    assert run_dir("outputs/x/2026-12-01_10-00-00") == first  # Hydra resolves it again
    monkeypatch.setattr(run_folder, "_made", {})  # as another process would
    second = run_dir("outputs/x/2026-12-01_10-00-00")
    assert (first, second) == ("outputs/x/2026-12-01_10-00-00", "outputs/x/2026-12-01_10-00-00_2")
    assert Path(first).is_dir() and Path(second).is_dir()


def test_a_checkpoint_of_an_app_run_resumes_in_that_run(tmp_path):
    run = tmp_path / "outputs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config_resolved.yaml").write_text("seed: 0\n")
    checkpoint = str(run / "checkpoints" / "latest-epoch003.ckpt")
    assert resumed_run_dir(checkpoint) == run
    assert run_dir(str(tmp_path / "fresh"), checkpoint) == str(run)
    assert hydra_subdir(checkpoint, "t") == ".hydra/resumed-t"
    # a checkpoint elsewhere (copied, downloaded) gets a new folder
    assert resumed_run_dir(str(tmp_path / "elsewhere.ckpt")) is None
    assert hydra_subdir(None, "t") == ".hydra"


def test_resumed_metrics_drop_the_crashed_rows_and_append(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version="")
    for step in range(6):
        logger.log_metrics({"loss": float(step)}, step=step)
    logger.save()
    metrics = Path(logger.log_dir) / "metrics.csv"
    assert truncate_metrics(metrics, before_step=4) == 4  # steps 4, 5 came after the ckpt
    resumed = AppendingCSVLogger(tmp_path, name="csv", version="")
    resumed.log_metrics({"loss": 40.0, "acc": torch.tensor(0.5)}, step=4)  # a new column
    resumed.save()
    lines = metrics.read_text().splitlines()
    assert lines[0] == "acc,loss,step"
    assert lines[1:] == ["", ",0.0,0", ",1.0,1", ",2.0,2", ",3.0,3", "0.5,40.0,4"][1:]
    # Lightning's own logger deletes the file: what the app's resume lost
    CSVLogger(tmp_path, name="csv", version="").log_metrics({"loss": 1.0}, step=9)
    assert not metrics.exists()
