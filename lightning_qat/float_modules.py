"""What stays float after `prepare_qat`, and why: nothing is left float silently.

A module that holds weights (Parameters of its own) and is not quantized computes in
float in the deployed model too: either by design (a normalisation is a float island,
DESIGN.md section 6; the user excluded it) or because lightning-qat does not quantize it
(an LSTM, a Conv3d, an attention with separate key/value widths, a Parameter the model
adds in its own ``forward``). `prepare_qat` names every one; ``QuantConfig(strict=True)``
refuses the second kind. A module whose class sets ``float_island`` (a string: why its
float computation is by design, e.g. a learned position embedding added before a
LayerNorm) counts as the first kind.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_qat.nn import QUANTIZED_LAYERS, FoldedBatchNorm2d, attention_unsupported
from lightning_qat.quant import FakeQuantize

#: Normalisations: float islands by design (no integer runtime normalises on codes).
NORMALIZATIONS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []),
)


@dataclass(frozen=True)
class FloatModule:
    """A module holding weights that stays float.

    Attributes:
        name: its qualified name (``""``: the model itself).
        kind: its class name.
        reason: why it stays float.
        by_design: a float island by design (a normalisation) or excluded by the user;
            ``False`` where lightning-qat cannot quantize it (``strict`` refuses those).
    """

    name: str
    kind: str
    reason: str
    by_design: bool

    def describe(self, model_name: str = "model") -> str:
        """``name (Kind): reason``, as warnings and errors list it."""
        return f"{self.name or model_name} ({self.kind}): {self.reason}"


def _reason(module: nn.Module, parameters: Sequence[str], float_attention: bool) -> str:
    if float_attention:
        return "output projection of a float MultiheadAttention (which reads its weight)"
    if isinstance(module, nn.MultiheadAttention):
        return f"attention with {attention_unsupported(module)}: not supported"
    if isinstance(module, nn.RNNBase):
        return (
            "recurrent layer: not quantized by QAT (deploy it with int8 weights and "
            "dynamic activation quantization, onnxruntime's DynamicQuantizeLSTM)"
        )
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding table: looked up in float"
    if isinstance(module, nn.modules.conv._ConvNd | nn.Bilinear):
        return f"{type(module).__name__} is not a layer lightning-qat quantizes"
    return f"holds Parameters {', '.join(parameters)} that its forward uses in float"


def float_modules(
    model: nn.Module,
    quantized: Collection[str],
    folded_bns: Collection[str] = (),
    exclude: Sequence[str] = (),
) -> list[FloatModule]:
    """The modules of ``model`` holding weights that stay float, in module order.

    Args:
        model: the float model (before conversion) or a prepared one.
        quantized: names of the layers that are (or will be) quantized; what they hold
            (an attention's output projection) is theirs.
        folded_bns: BatchNorms folded into their convolution, in training or at export.
        exclude: `QuantConfig.exclude` patterns: what they match is float by design.
    """
    attentions = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    found = []
    for name, module in model.named_modules():
        parameters = [n for n, _ in module.named_parameters(recurse=False)]
        if (
            not parameters
            or name in quantized
            or name in folded_bns
            or any(name.startswith(f"{q}.") for q in quantized if q)
            or isinstance(module, (*QUANTIZED_LAYERS, FakeQuantize, FoldedBatchNorm2d))
        ):
            continue
        kind = type(module).__name__
        parent = name.rpartition(".")[0]
        float_attention = parent in attentions
        if any(
            fnmatch.fnmatchcase(name, p) or (float_attention and fnmatch.fnmatchcase(parent, p))
            for p in exclude
        ):
            found.append(FloatModule(name, kind, "excluded (QuantConfig.exclude)", True))
        elif isinstance(module, NORMALIZATIONS):
            reason = "normalisation: a float island (runtimes normalise in float)"
            found.append(FloatModule(name, kind, reason, True))
        elif isinstance(getattr(module, "float_island", None), str):
            found.append(FloatModule(name, kind, f"float island: {module.float_island}", True))
        else:
            found.append(
                FloatModule(name, kind, _reason(module, parameters, float_attention), False)
            )
    return found
