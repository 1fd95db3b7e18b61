"""A small vision transformer for 32x32 images (ViT-tiny)."""

from __future__ import annotations

import torch
from torch import nn


class PositionEmbedding(nn.Module):
    """Adds a learned position embedding ``[1, tokens, width]`` to the tokens (float: the
    sum feeds a LayerNorm, a float island, in the deployed model too)."""

    #: by design float (`lightning_qat.float_modules`): ``QuantConfig(strict=True)`` accepts it
    float_island = "a learned position embedding, added in float before a LayerNorm"

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, tokens, width))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class EncoderBlock(nn.Module):
    """A pre-norm transformer encoder block (Vaswani et al. 2017; pre-norm as in ViT):
    ``x + attention(norm1(x))``, then ``x + mlp(norm2(x))`` with a GELU MLP.

    The same computation as torch's ``TransformerEncoderLayer(norm_first=True,
    activation="gelu")``, written without its fused fast path so that torch.fx traces
    it: the export reads the model's graph."""

    def __init__(self, width: int, heads: int, mlp_width: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) sized for CIFAR: a ``patch x patch`` convolution to
    tokens, learned position embeddings, pre-norm encoder blocks, a final LayerNorm and a
    linear head on the mean token (global average pooling instead of a class token, their
    appendix D.3: as accurate, and every Parameter sits in a layer).

    Args:
        num_classes: outputs of the head.
        image_size: input height and width.
        patch: patch side (``image_size`` divisible by it).
        width: token width.
        depth: encoder blocks.
        heads: attention heads.
        mlp_ratio: MLP width over ``width``.
        dropout: dropout in the blocks.
        in_channels: input channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch: int = 4,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not divisible by patch={patch}")
        self.patch_embedding = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.position_embedding = PositionEmbedding((image_size // patch) ** 2, width)
        self.blocks = nn.Sequential(
            *[EncoderBlock(width, heads, width * mlp_ratio, dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [N, tokens, width]
        tokens = self.norm(self.blocks(self.position_embedding(tokens)))
        return self.head(tokens.mean(dim=1))


def vit_tiny(num_classes: int = 10, in_channels: int = 3, **kwargs) -> VisionTransformer:
    """ViT-tiny for 32x32 inputs: 4x4 patches (64 tokens), width 128, 4 blocks, 4 heads."""
    return VisionTransformer(num_classes=num_classes, in_channels=in_channels, **kwargs)
