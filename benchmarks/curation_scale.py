"""Curation at scale on CPU: (a) cosine k-NN graph (IVF) + connected components, (b) two-level hierarchical
k-means with resampling (Vo et al.), over a synthetic pool of unit vectors memory-mapped from disk.

    .venv/bin/python benchmarks/curation_scale.py --rows 1000000 --dim 384 \
        --out benchmarks/results/curation_scale.json

The pool is a mixture of Gaussians on the unit sphere (modes of different tightness, so the k-NN graph
at cosine > 0.6 joins some modes and not others), generated chunk by chunk into a temporary .npy that
is read back as a memory-mapped shard source. Each phase runs in its own subprocess, so its peak RSS
(ru_maxrss of that process) is the peak of that phase alone; wall time and the load average around it
are recorded, because the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class MemmapVectors:
    """A single (N, D) float32 .npy file served as memory-mapped shards (a VectorSource)."""

    path: Path
    shard_size: int = 65_536

    def _array(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    @property
    def dim(self) -> int:
        return int(self._array().shape[1])

    @property
    def num_rows(self) -> int:
        return int(self._array().shape[0])

    def iter_shards(self, mmap: bool = True) -> Iterator[tuple[list[str], np.ndarray]]:
        array = self._array()
        for start in range(0, array.shape[0], self.shard_size):
            stop = min(start + self.shard_size, array.shape[0])
            yield [f"r{i}" for i in range(start, stop)], array[start:stop]

    def ids(self) -> list[str]:
        return [f"r{i}" for i in range(self.num_rows)]


def generate_pool(path: Path, rows: int, dim: int, modes: int, seed: int, chunk: int = 65_536) -> None:
    """Unit vectors from ``modes`` Gaussian modes (per-mode spread 0.02..0.06 per dimension), written in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((modes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.02, 0.06, size=modes).astype(np.float32)  # same-mode cosine about 0.87 .. 0.42 at D=384
    weights = rng.pareto(1.5, size=modes) + 1.0  # a long tail of mode sizes, as in web data
    weights /= weights.sum()
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        mode = rng.choice(modes, size=n, p=weights)
        x = centres[mode] + spread[mode, None] * rng.standard_normal((n, dim), dtype=np.float32)  # (n, D)
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out


def phase_knn(source: MemmapVectors, args: argparse.Namespace) -> dict[str, Any]:
    from components.curation.knn_graph import KnnConfig, default_nlist, knn_graph
    from components.curation.union_find import connected_components

    nlist = args.nlist or default_nlist(source.num_rows)
    cfg = KnnConfig(k=64, threshold=0.6, index="ivf", nlist=nlist, nprobe=args.nprobe, use_gpu=False)
    started = time.perf_counter()
    graph = knn_graph(source, cfg)
    graph_s = time.perf_counter() - started
    labels = connected_components(graph.num_nodes, graph.edges.src, graph.edges.dst)
    sizes = np.bincount(np.unique(labels, return_inverse=True)[1])
    return {"k": 64, "threshold": 0.6, "index": "ivf", "nlist": nlist, "nprobe": min(args.nprobe, nlist),
            "edges": graph.edges.num_edges, "graph_s": round(graph_s, 2),
            "components_s": round(time.perf_counter() - started - graph_s, 2),
            "components": int(sizes.shape[0]), "largest_component": int(sizes.max()),
            "rows_in_nontrivial_components": int(sizes[sizes > 1].sum())}


def phase_hkmeans(source: MemmapVectors, args: argparse.Namespace) -> dict[str, Any]:
    from components.curation.hierarchical import HierarchicalKMeansConfig, balanced_sample, hierarchical_kmeans

    cfg = HierarchicalKMeansConfig(levels=[1000, 100], n_iter=args.n_iter, resampling_steps=args.resampling_steps,
                                   resample_per_cluster=10, seed=0, max_train_rows=args.max_train_rows,
                                   use_gpu=False)
    started = time.perf_counter()
    clustering = hierarchical_kmeans(source, cfg)
    cluster_s = time.perf_counter() - started
    chosen = balanced_sample(clustering, source.num_rows // 10, seed=0)
    top = clustering.cluster_sizes(1)
    picked_top = np.bincount(clustering.point_clusters(1)[chosen], minlength=top.shape[0])
    return {"levels": cfg.levels, "n_iter": cfg.n_iter, "resampling_steps": cfg.resampling_steps,
            "resample_per_cluster": cfg.resample_per_cluster,
            "train_rows": min(cfg.max_train_rows or source.num_rows, source.num_rows), "cluster_s": round(cluster_s, 2),
            "balanced_sample_s": round(time.perf_counter() - started - cluster_s, 2),
            "sample_size": int(chosen.shape[0]),
            "top_cluster_sizes": {"min": int(top.min()), "max": int(top.max())},
            "sampled_per_top_cluster": {"min": int(picked_top.min()), "max": int(picked_top.max())}}


PHASES = {"knn": phase_knn, "hkmeans": phase_hkmeans}


def run_phase_here(args: argparse.Namespace) -> None:
    """Child process: one phase; prints its JSON (with this process's peak RSS) as the last line."""
    source = MemmapVectors(Path(args.data))
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = PHASES[args.phase](source, args)
    result["wall_s"] = round(time.perf_counter() - started, 2)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    result["loadavg_before"] = [round(v, 2) for v in load_before]
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))


def run_phase_child(phase: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--phase", phase, "--data", str(data), "--nprobe", str(args.nprobe),
               "--nlist", str(args.nlist), "--n-iter", str(args.n_iter),
               "--resampling-steps", str(args.resampling_steps), "--max-train-rows", str(args.max_train_rows)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def write_json_atomic(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")
    os.replace(temp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--modes", type=int, default=2000, help="Gaussian modes in the synthetic pool")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists for the k-NN graph; 0: 4*sqrt(N)")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--n-iter", type=int, default=10, help="Lloyd iterations per k-means run")
    parser.add_argument("--resampling-steps", type=int, default=3)
    parser.add_argument("--max-train-rows", type=int, default=200_000, help="level-0 training sample; 0: all")
    parser.add_argument("--phases", default="hkmeans,knn")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "curation_scale.json")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase_here(args)
        return
    with tempfile.TemporaryDirectory(prefix="curation-scale-") as folder:
        data = Path(folder) / "pool.npy"
        started = time.perf_counter()
        generate_pool(data, args.rows, args.dim, args.modes, seed=0)
        report: dict[str, Any] = {
            "rows": args.rows, "dim": args.dim, "modes": args.modes, "command": " ".join(sys.argv[1:]),
            "generate_s": round(time.perf_counter() - started, 2),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]},
            "phases": {},
            "notes": ["peak_rss_mib is ru_maxrss of the phase's own process; it includes the file-backed pages of "
                      "the memory-mapped pool it touched (N x D x 4 bytes when a phase streams every row), which "
                      "the kernel can reclaim, not only anonymous memory",
                      "wall times are on a shared machine: see loadavg_before/after per phase"],
        }
        for phase in args.phases.split(","):
            report["phases"][phase] = run_phase_child(phase, data, args)
            write_json_atomic(report, args.out)  # partial results survive a later phase failing
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
