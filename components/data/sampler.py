"""An infinite, seeded, rank-sharded index stream that resumes exactly, even on another world size.

The contract
------------
There is one **global stream**: the concatenation ``perm(seed + 0) ++ perm(seed + 1) ++ ...`` where
``perm(s)`` is ``torch.randperm(dataset_size)`` drawn from a ``torch.Generator`` seeded with ``s``
(never the global RNG, so nothing else in the process can shift it). A **position** is an offset
into that stream, counted in *global* samples.

Rank ``r`` of ``W`` starting at position ``p`` yields the stream's elements at ``p + r``,
``p + r + W``, ``p + r + 2W``, ... So:

* ranks never overlap, and within each epoch (``dataset_size`` consecutive positions) every index
  is taken exactly once by exactly one rank;
* after each rank has drawn ``k`` batches of ``b`` samples, the ranks together have consumed
  exactly the positions ``[p, p + k * b * W)``, and global step ``j`` is the contiguous slice
  ``[p + j * b * W, p + (j + 1) * b * W)`` of the stream, whatever ``W`` is.

Hence **resuming** at ``position = p + k * b * W`` on ``W'`` ranks with per-rank batch ``b'`` such
that ``b' * W' == b * W`` (same global batch) gives every later global step the *same set* of
samples as the uninterrupted run; only which rank holds which sample of the step changes.
(With a different global batch the stream still continues seamlessly, only step boundaries move.)

Checkpointing: a DataLoader pulls indices ahead of training (``num_workers * prefetch_factor``
batches), so the sampler's own counter runs ahead of what the model has seen. Save
``sampler.state_dict(consumed=steps_done * per_rank_batch)`` (or ``global_position(...)``),
not the bare ``state_dict()``, when a DataLoader sits in between.

Each ``__iter__`` continues from the sampler's current position (``start``, or what
``load_state_dict`` set, advanced by what earlier iterators yielded).

``tag_epoch=True`` yields ``epoch * dataset_size + index`` instead of ``index``: a dataset that
maps ``i -> i % dataset_size`` (``ManifestImageDataset`` does) can then give every visit of an
image its own, still reproducible, augmentation seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

# Indices are materialised to Python ints in chunks: bounded memory even for 100M-image epochs.
_CHUNK = 1 << 16


def global_position(start: int, consumed_per_rank: int, world_size: int) -> int:
    """Global stream position after every rank consumed ``consumed_per_rank`` samples from ``start``."""
    return start + consumed_per_rank * world_size


def epoch_permutation(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The ``epoch``-th permutation of the global stream, ``(dataset_size,)`` int64."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(dataset_size, generator=generator)


class InfiniteShardedSampler(Sampler[int]):
    """Endless seeded permutations of ``range(dataset_size)``, rank ``r`` taking every ``W``-th element."""

    def __init__(
        self,
        dataset_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
        tag_epoch: bool = False,
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.tag_epoch = tag_epoch
        self.start = start
        self._yielded = 0  # per-rank indices handed out since ``start``

    @property
    def position(self) -> int:
        """Global position reached by what this sampler has yielded (runs ahead of training under a DataLoader)."""
        return global_position(self.start, self._yielded, self.world_size)

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """``{"position", "seed"}``; ``consumed`` = per-rank samples training really used since ``start``."""
        used = self._yielded if consumed is None else consumed
        return {"position": global_position(self.start, used, self.world_size), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the global stream at ``state["position"]`` (rank and world size may differ from the saver's)."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"checkpoint seed {state['seed']} differs from this sampler's seed {self.seed}")
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self.start = position
        self._yielded = 0

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            return epoch_permutation(self.dataset_size, self.seed, epoch)  # (N,)
        return torch.arange(self.dataset_size)  # (N,)

    def __iter__(self) -> Iterator[int]:
        size, stride = self.dataset_size, self.world_size
        cursor = self.position + self.rank  # global position of this rank's next element
        while True:
            epoch, offset = divmod(cursor, size)
            order = self._epoch_order(epoch)
            mine = order[offset::stride]  # (ceil((N - offset) / W),) this rank's share of the epoch's rest
            if self.tag_epoch:
                mine = mine + epoch * size
            for begin in range(0, len(mine), _CHUNK):
                for index in mine[begin : begin + _CHUNK].tolist():
                    self._yielded += 1
                    yield index
            # Stride straight over the epoch boundary: the next epoch's offset is where it lands.
            cursor += stride * len(mine)

    def __len__(self) -> int:
        # DataLoader asks for len() only in some paths; an infinite stream has none to give.
        raise TypeError("InfiniteShardedSampler is infinite and has no length")
