"""Bit-reproducible training on one machine: torch's deterministic algorithms for the length of a run.

Why it is a switch: every draw in the engine is already seeded (weights, data order, augmentation,
iBOT masks, drop path), yet two CPU runs with two intra-op threads still ended with different weights
(measured: one thread was bit-identical, two threads were not), because some kernels reduce in an
order that depends on thread scheduling. ``torch.use_deterministic_algorithms`` picks the
order-fixed kernels; on this 2-core CPU it cost about 10% of a short run's wall time
(docs/pretraining.md, Reproducibility). The DVC stages turn it on, so that ``dvc repro`` on a fresh
clone reproduces ``dvc.lock``; the library default (off) is the official code's behaviour.

On CUDA, cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment before the process
starts; ops without a deterministic kernel warn instead of failing (``warn_only``), so a GPU run is
never stopped by the switch, only told where it cannot be exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Deterministic kernels inside the block when ``enabled``; the process's previous setting after it."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
