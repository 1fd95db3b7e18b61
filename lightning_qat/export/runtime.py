"""Running an exported model in onnxruntime, and measuring any deployed model."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def require(package: str) -> Any:
    """Import an optional dependency of the exporters, or say how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(
            f"{package} is needed to export and run ONNX models: "
            "pip install 'lightning-qat[export]'"
        ) from error


class OnnxRuntimeModel:
    """An ONNX file in an onnxruntime CPU session, called like a model: float tensor in,
    float logits out.

    All of onnxruntime's graph optimizations are on: they fuse the QDQ groups into its
    integer kernels. ``threads`` sets the intra-op threads (onnxruntime's default: one a
    physical core).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.run(array))


@torch.no_grad()
def evaluate_deployment(
    deployed: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    loader: Iterable,
    prefix: str,
    max_batches: int | None = None,
) -> dict[str, float | int]:
    """Test accuracy of a deployed model (the integer reference, an onnxruntime session)
    and how often its top-1 equals that of ``model`` (the fake-quant model), over the
    (input, label) batches of ``loader`` (the first ``max_batches`` if given).

    Returns ``{prefix}_test_acc``, ``{prefix}_agreement``, ``{prefix}_test_images`` and
    ``{prefix}_seconds`` (wall time in ``deployed`` alone, data loading and the fake-quant
    model left out).
    """
    hits = agree = seen = 0
    seconds = 0.0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for index, (x, y) in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        start = time.perf_counter()
        predicted = deployed(x).argmax(1).cpu()
        seconds += time.perf_counter() - start
        hits += int((predicted == y).sum())
        agree += int((predicted == model(x.to(device)).argmax(1).cpu()).sum())
        seen += len(y)
    model.train(was_training)
    if not seen:
        raise ValueError("evaluate_deployment: the loader gave no batch")
    return {
        f"{prefix}_test_acc": hits / seen,
        f"{prefix}_agreement": agree / seen,
        f"{prefix}_test_images": seen,
        f"{prefix}_seconds": seconds,
    }
