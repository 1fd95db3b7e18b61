"""`EpochSampler`: the training order and augmentation of an epoch, a pure function of
the seed and the epoch number, so a run resumed from a checkpoint trains on exactly the
batches the uninterrupted run would have."""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """Shuffles with ``seed + epoch`` (torch's `DistributedSampler`; Lightning calls
    ``set_epoch`` at every epoch start) and yields ``(index, epoch)`` keys, so a dataset
    that augments (`TensorImageDataset`) draws the sample's crop and flip from the seed,
    the epoch and the index, not from a process's random state.

    Neither the global RNG, nor the DataLoader workers' (persistent workers keep theirs
    from epoch to epoch), nor the number of ranks enters: a resumed run, a run with more
    workers and an uninterrupted run see the same samples. Under DDP the sampler splits the
    data over the ranks itself (Lightning leaves a `DistributedSampler` as it is).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, drop_last: bool = False):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((index, epoch) for index in super().__iter__())
