"""Endless, per-rank, resumable batches from any dataset.

- A map-style :class:`torch.utils.data.Dataset` is shuffled once per epoch by
  :class:`torch.utils.data.DistributedSampler` (seed + epoch) and split across ranks, so every
  sample is seen once per epoch across all ranks; the last incomplete global batch is dropped.
- Anything else that can be iterated (an :class:`~torch.utils.data.IterableDataset`, a list, a
  generator factory) is a stream: every rank reads it and keeps items ``rank, rank + W, ...``;
  streams are read in order and restarted when exhausted.

The position (epoch and samples consumed in it, counted over all ranks) is a small dict:
``state_dict()`` after any batch, ``load_state_dict()`` before the next, and the batches continue
exactly where they stopped (a stream is fast-forwarded by reading it again, so give long runs on
expensive streams a map-style dataset). Loader iterators own their random generator, so building
one never draws from the global torch RNG (which would break bitwise resumption).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler


def stack_collate(items: list[dict]) -> dict:
    """A batch dict from sample dicts of tensors: ``{k: torch.stack([...])}``."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def is_map_style(dataset) -> bool:
    return isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset)


class _IndexList(Sampler[int]):
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ShardedBatches:
    """Endless batches of ``batch_size`` samples for ``rank`` of ``world`` (see module doc)."""

    def __init__(self, dataset, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, collate: Callable[[list], dict] = stack_collate,
                 num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        if not is_map_style(dataset) and not isinstance(dataset, Iterable):
            raise TypeError(f"dataset must be a map-style Dataset or an iterable of sample "
                            f"dicts, got {type(dataset).__name__}")
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world
        self.seed, self.collate, self.num_workers = seed, collate, num_workers
        self.epoch = 0
        self.consumed = 0          # samples consumed in this epoch over all ranks
        self._it: Iterator | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._it = None

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> dict:
        for _ in range(2):  # at most one epoch change per batch
            if self._it is None:
                self._it = self._epoch_iterator()
            batch = next(self._it, None)
            if batch is not None:
                self.consumed += self.batch_size * self.world
                return batch
            if self.consumed == 0:
                raise ValueError(f"the dataset yielded fewer than batch_size={self.batch_size} "
                                 f"samples per rank (world size {self.world})")
            self.epoch, self.consumed, self._it = self.epoch + 1, 0, None
        raise ValueError(f"the dataset yielded fewer than batch_size={self.batch_size} samples "
                         f"per rank (world size {self.world})")

    def _epoch_iterator(self) -> Iterator[dict]:
        skip = self.consumed // self.world
        if is_map_style(self.dataset):
            sampler = DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=self.seed, drop_last=True)
            sampler.set_epoch(self.epoch)
            indices = list(sampler)[skip:]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            return iter(DataLoader(self.dataset, batch_size=self.batch_size,
                                   sampler=_IndexList(indices), drop_last=True,
                                   collate_fn=self.collate, num_workers=self.num_workers,
                                   generator=gen))
        mine = itertools.islice(iter(self.dataset), self.rank, None, self.world)
        return self._stream_batches(itertools.islice(mine, skip, None))

    def _stream_batches(self, items: Iterator) -> Iterator[dict]:
        while True:
            chunk = list(itertools.islice(items, self.batch_size))
            if len(chunk) < self.batch_size:
                return
            yield self.collate(chunk)
