"""Union-find (disjoint sets) and the connected components of an edge list.

Path compression (halving) plus union by size keep every operation near O(1) amortised, so a
graph with millions of edges is labelled in one pass over them.
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    def __init__(self, n: int) -> None:
        # Python lists, not numpy arrays: scalar indexing of lists is several times faster.
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, node: int) -> int:
        parent = self.parent
        while parent[node] != node:
            parent[node] = parent[parent[node]]  # path halving: every visited node skips a level
            node = parent[node]
        return node

    def union(self, a: int, b: int) -> bool:
        """Merge the sets of ``a`` and ``b``; False when they were already one set."""
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return False
        if self.size[root_a] < self.size[root_b]:  # hang the smaller tree below the larger: depth O(log n)
            root_a, root_b = root_b, root_a
        self.parent[root_b] = root_a
        self.size[root_a] += self.size[root_b]
        return True


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label (n,) int64 of each node: the smallest node number in its component.

    Labelling by the smallest member (not by the union-find root) makes labels independent of the
    order of the edges.
    """
    sets = UnionFind(n)
    for a, b in zip(src.tolist(), dst.tolist(), strict=True):
        sets.union(a, b)
    roots = np.fromiter((sets.find(i) for i in range(n)), dtype=np.int64, count=n)  # (n,)
    smallest = np.full(n, n, dtype=np.int64)
    np.minimum.at(smallest, roots, np.arange(n, dtype=np.int64))  # per root: its smallest member
    return smallest[roots]  # (n,)
