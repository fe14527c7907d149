"""Packed variable-length token batches: all crops of a training step as one token sequence.

DINOv2 (arXiv 2304.07193, Sec. 5, "Sequence packing") runs the global and the local crops
through the backbone in one pass: token-wise operations see the concatenation of every sequence,
and attention is restricted to each sequence. A :class:`PackedLayout` describes such a batch: a list
of crop groups, group ``i`` holding ``batch_sizes[i]`` sequences of ``seq_lens[i]`` tokens each. The
packed tensor is ``(T, D)`` with ``T = sum(batch_sizes[i] * seq_lens[i])``, groups in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SequenceRun:
    """Consecutive sequences of equal length: one batched attention call covers them all."""

    start: int  # first token of the run in the packed tensor
    batch_size: int
    seq_len: int

    @property
    def stop(self) -> int:
        return self.start + self.batch_size * self.seq_len


@dataclass(frozen=True)
class PackedLayout:
    """Shape of a packed token batch: ``batch_sizes[i]`` sequences of ``seq_lens[i]`` tokens per group."""

    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]
    # Backend objects derived from the layout (e.g. an xformers block-diagonal bias), built once per
    # forward pass and shared by every block rather than rebuilt in each attention call.
    cache: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.batch_sizes) != len(self.seq_lens) or not self.batch_sizes:
            raise ValueError(f"need one seq_len per group, got {self.batch_sizes} and {self.seq_lens}")
        if min(self.batch_sizes) < 1 or min(self.seq_lens) < 1:
            raise ValueError(f"empty group in layout: {self.batch_sizes} x {self.seq_lens}")

    @classmethod
    def of(cls, groups: Sequence[Tensor]) -> PackedLayout:
        """Layout of token tensors shaped ``(B_i, N_i, D)``."""
        return cls(tuple(int(g.shape[0]) for g in groups), tuple(int(g.shape[1]) for g in groups))

    def with_batch_sizes(self, batch_sizes: Sequence[int]) -> PackedLayout:
        """Same sequence lengths, other group sizes (used for the stochastic-depth subsets)."""
        return PackedLayout(tuple(batch_sizes), self.seq_lens)

    @property
    def group_token_counts(self) -> list[int]:
        return [b * n for b, n in zip(self.batch_sizes, self.seq_lens, strict=True)]

    @property
    def num_tokens(self) -> int:
        return sum(self.group_token_counts)

    def sequence_lengths(self) -> list[int]:
        """Length of every sequence in packing order (what a block-diagonal mask is built from)."""
        return [n for b, n in zip(self.batch_sizes, self.seq_lens, strict=True) for _ in range(b)]

    def runs(self) -> list[SequenceRun]:
        """Maximal runs of adjacent groups with equal sequence length.

        Adjacent groups of equal length are contiguous in the packed tensor, so one reshape (no copy)
        turns the run into a regular ``(B, N, D)`` batch.
        """
        runs: list[SequenceRun] = []
        start = 0
        for b, n in zip(self.batch_sizes, self.seq_lens, strict=True):
            if runs and runs[-1].seq_len == n:
                last = runs[-1]
                runs[-1] = SequenceRun(last.start, last.batch_size + b, n)
            else:
                runs.append(SequenceRun(start, b, n))
            start += b * n
        return runs

    def pack(self, groups: Sequence[Tensor]) -> Tensor:
        """Concatenate ``(B_i, N_i, D)`` groups into one ``(T, D)`` tensor."""
        if PackedLayout.of(groups) != self:
            raise ValueError(f"groups {[tuple(g.shape) for g in groups]} do not match {self}")
        return torch.cat([g.reshape(-1, g.shape[-1]) for g in groups], dim=0)  # (T, D)

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """Views of a ``(T, ...)`` tensor as its ``(B_i, N_i, ...)`` groups."""
        if packed.shape[0] != self.num_tokens:
            raise ValueError(f"packed tensor has {packed.shape[0]} tokens, layout expects {self.num_tokens}")
        chunks = packed.split(self.group_token_counts, dim=0)
        sizes = zip(chunks, self.batch_sizes, self.seq_lens, strict=True)
        return [chunk.view(b, n, *packed.shape[1:]) for chunk, b, n in sizes]
