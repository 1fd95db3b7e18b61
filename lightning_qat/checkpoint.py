"""Restore a QAT checkpoint into a fresh model, outside any Trainer."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_qat.callback import QuantizationAwareTraining
from lightning_qat.prepare import prepare_qat
from lightning_qat.quant import QuantConfig

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def qat_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The `QuantizationAwareTraining` state saved in a Lightning checkpoint, if any."""
    return checkpoint.get("callbacks", {}).get(QuantizationAwareTraining().state_key)


def restore_qat_checkpoint(
    model: ModuleT, checkpoint: str | os.PathLike | dict[str, Any], strict: bool = True
) -> ModuleT:
    """Load a Lightning checkpoint written with `QuantizationAwareTraining` into ``model``.

    ``model`` is a fresh float instance of the checkpoint's LightningModule (or any module
    with the same ``state_dict`` layout). If the checkpoint holds a converted model, ``model``
    is converted with the checkpoint's `QuantConfig` first; then its weights, BN statistics,
    scales, zero points and freeze flags are loaded. Returns ``model``, in eval mode.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state_dict = checkpoint["state_dict"]
    quantized = any(".weight_quantizer." in k for k in state_dict)
    if quantized:
        state = qat_state(checkpoint)
        if state is None:
            raise ValueError(
                "the checkpoint holds fake-quant layers but no QuantizationAwareTraining "
                "state: convert the model with prepare_qat(model, config) and call "
                "model.load_state_dict(checkpoint['state_dict']) yourself"
            )
        prepare_qat(model, QuantConfig(**state["config"]))
    model.load_state_dict(state_dict, strict=strict)
    return model.eval()


def load_qat_checkpoint(
    cls: type[ModuleT], checkpoint_path: str | os.PathLike, **kwargs: Any
) -> ModuleT:
    """``cls.load_from_checkpoint`` for QAT checkpoints.

    Lightning builds ``cls`` from the saved hyperparameters (and ``kwargs``) as usual, then
    the model is converted with the checkpoint's config and its full state loaded.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    model = cls.load_from_checkpoint(checkpoint_path, strict=False, **kwargs)
    return restore_qat_checkpoint(model, checkpoint)
