"""Images held as one uint8 tensor, augmented on the fly: decoding happens once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64, normalised per channel.

    Training augmentation as the reference CIFAR pipeline: random crop with zero padding
    ``crop_padding`` and a random horizontal flip (He et al. 2016, section 4.2). Images
    stay uint8 in memory (50k CIFAR images are 150 MB), so loading never waits on JPEG
    decoding.

    Indexed by an ``(index, epoch)`` key (what `EpochSampler` yields), the crop and flip
    are a hash of ``seed``, the epoch and the index: the same in every process, worker and
    resumed run. Indexed by a plain int they come from torch's global RNG.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.crop_padding = crop_padding
        self.flip = flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        image = self.images[index]
        p = self.crop_padding
        if epoch is None:
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist() if p else (0, 0)
            flip = self.flip and bool(torch.rand(()) < 0.5)
        else:
            draw = _mix(self.seed, epoch, index)
            top, left = draw % (2 * p + 1), (draw >> 16) % (2 * p + 1)
            flip = self.flip and bool(draw >> 32 & 1)
        if p:
            _, h, w = image.shape
            padded = torch.nn.functional.pad(image, (p, p, p, p))
            image = padded[:, top : top + h, left : left + w]
        if flip:
            image = image.flip(-1)
        x = (image.float() / 255.0 - self.mean) / self.std
        return x, self.labels[index]


def _mix(*values: int) -> int:
    """A 64-bit hash of the integers: SplitMix64's finaliser (Steele et al. 2014) applied
    to each in turn; uniform enough to draw a crop offset and a flip from."""
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & mask
        state ^= state >> 31
    return state


def balanced_subset(labels: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices of a fixed class-balanced subset: ``size // num_classes`` per class (the
    remainder to the first classes), drawn with ``seed``; sorted."""
    classes = labels.unique()
    if size > len(labels):
        raise ValueError(f"subset size {size} exceeds the {len(labels)} images")
    generator = torch.Generator().manual_seed(seed)
    per_class, extra = divmod(size, len(classes))
    chosen = []
    for i, c in enumerate(classes):
        members = (labels == c).nonzero().flatten()
        take = per_class + (1 if i < extra else 0)
        if take > len(members):
            raise ValueError(f"class {int(c)} has {len(members)} images, {take} asked")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values
