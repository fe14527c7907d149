"""Curation at scale on CPU: (a) cosine k-NN graph (blocked IVF) + connected components, (b) two-level
hierarchical k-means with resampling (Vo et al.), over a synthetic pool of unit vectors memory-mapped from disk.

    .venv/bin/python benchmarks/curation_scale.py --rows 1000000 --dim 384 \
        --out benchmarks/results/curation_scale.json
    .venv/bin/python benchmarks/curation_scale.py --fit benchmarks/results/curation_scale_*.json \
        --out benchmarks/results/curation_scale_fit.json   # power-law extrapolation to 10M rows

The pool is a mixture of Gaussians on the unit sphere (modes of different tightness, so the k-NN graph
at cosine > 0.6 joins some modes and not others), generated chunk by chunk into a temporary .npy that
is read back as a memory-mapped shard source. Each phase runs in its own subprocess, so its peak RSS
(ru_maxrss of that process) is the peak of that phase alone. Per step the phase records wall seconds,
CPU seconds (user + sys of the process) and the peak RSS so far; the load average around each phase
is recorded, because the machine may be shared. ``quiet_wall_estimate_s`` = CPU seconds / cores is an
ESTIMATE of the wall time on an idle machine (exact only for steps that keep every core busy).

The k-NN phase also measures the recall of the blocked IVF: for ``--recall-queries`` seeded random
rows, the graph's own top-64 lists (before thresholding) against an exact float32 brute-force search
of the same rows over the whole pool; "edge recall" is the share of the exact cosine > 0.6 edges
among those rows' top-64 that the blocked search also finds. Its cost is reported, not counted.
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
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class MemmapVectors:
    """A single (N, D) float32 .npy file served as memory-mapped shards (a VectorSource).

    Each shard maps the file afresh, so once a consumer drops a shard its pages leave this process's
    RSS: a whole-file mapping would count every page ever read (N x D x 4 bytes) in ru_maxrss.
    """

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
        for start in range(0, self.num_rows, self.shard_size):
            array = self._array()
            stop = min(start + self.shard_size, array.shape[0])
            yield [f"r{i}" for i in range(start, stop)], array[start:stop]
            del array

    def ids(self) -> list[str]:
        return [f"r{i}" for i in range(self.num_rows)]


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


class StepTimer:
    """Wall, CPU and peak RSS of consecutive named steps."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, float]] = {}
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def done(self, name: str) -> None:
        wall, cpu = time.perf_counter(), cpu_seconds()
        self.steps[name] = {"wall_s": round(wall - self.wall, 2), "cpu_s": round(cpu - self.cpu, 2),
                            "quiet_wall_estimate_s": round((cpu - self.cpu) / (os.cpu_count() or 1), 2),
                            "peak_rss_mib_so_far": peak_rss_mib()}
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def total(self, names: list[str]) -> dict[str, float]:
        return {key: round(sum(self.steps[n][key] for n in names), 2)
                for key in ("wall_s", "cpu_s", "quiet_wall_estimate_s")}


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


def exact_top_k(vectors: torch.Tensor, rows: np.ndarray, k: int, chunk: int = 8_192) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours, cosine) (q, k) of ``rows`` over all of ``vectors`` (N, D), self excluded: brute force."""
    queries = vectors[torch.from_numpy(rows)]  # (q, D)
    best = torch.full((rows.shape[0], k), -np.inf)
    best_rows = torch.full((rows.shape[0], k), -1, dtype=torch.int64)
    own = torch.from_numpy(rows)[:, None]  # (q, 1)
    for start in range(0, vectors.shape[0], chunk):
        scores = queries @ vectors[start:start + chunk].T  # (q, c)
        columns = torch.arange(start, start + scores.shape[1]).expand(rows.shape[0], -1)  # (q, c)
        scores[columns == own] = -np.inf
        best, picked = torch.topk(torch.cat([best, scores], 1), k, dim=1)
        best_rows = torch.gather(torch.cat([best_rows, columns], 1), 1, picked)
    return best_rows.numpy(), best.numpy()


def recall_report(index: Any, args: argparse.Namespace, k: int, threshold: float) -> dict[str, Any]:
    from components.curation.blocked_ivf import self_knn

    n = int(index.vectors.shape[0])
    rows = np.sort(np.random.default_rng(1).choice(n, min(args.recall_queries, n), replace=False))
    started = time.perf_counter()
    found, found_cos = self_knn(index, k, rows)  # the graph's own lists, (q, k)
    exact, exact_cos = exact_top_k(index.vectors, rows, k)
    overlap = [len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist(), strict=True)]
    edges_exact = [set(r[c > threshold]) for r, c in zip(exact, exact_cos, strict=True)]
    edges_found = [set(r[c > threshold]) for r, c in zip(found, found_cos, strict=True)]
    exact_edges = sum(len(e) for e in edges_exact)
    return {"queries": int(rows.shape[0]), "method": "seeded random rows; their top-64 lists from the blocked IVF "
            "vs exact float32 brute force over all rows", f"recall_at_{k}": round(float(np.mean(overlap)) / k, 4),
            "edge_recall": round(sum(len(a & b) for a, b in zip(edges_exact, edges_found, strict=True))
                                 / max(1, exact_edges), 4),
            "exact_edges_per_query": round(exact_edges / rows.shape[0], 2),
            "wall_s": round(time.perf_counter() - started, 2)}


def phase_knn(source: MemmapVectors, args: argparse.Namespace) -> dict[str, Any]:
    from components.curation.blocked_ivf import build_blocked_ivf, self_blocks, thresholded
    from components.curation.knn_graph import DEFAULT_BLOCKED_NPROBE, KnnConfig, blocked_settings, undirected
    from components.curation.union_find import connected_components

    k, threshold = 64, 0.6
    settings = blocked_settings(source.num_rows, KnnConfig(k=k, threshold=threshold, index="ivf_blocked",
                                                           nlist=args.nlist or None,
                                                           nprobe=args.nprobe or DEFAULT_BLOCKED_NPROBE))
    timer = StepTimer()
    index = build_blocked_ivf(source, **settings)
    timer.done("build_index")
    parts = thresholded(self_blocks(index, k), threshold)
    timer.done("search")
    sizes_lists = np.diff(index.offsets)
    del index
    edges = parts.concatenate()
    graph = undirected(edges)
    del edges
    timer.done("pair_dedup")
    labels = connected_components(source.num_rows, graph.src, graph.dst)
    timer.done("components")
    sizes = np.bincount(np.unique(labels, return_inverse=True)[1])
    steps = ["build_index", "search", "pair_dedup", "components"]
    return {"k": k, "threshold": threshold, "index": "ivf_blocked", **settings,
            "list_sizes": {"min": int(sizes_lists.min()), "median": float(np.median(sizes_lists)),
                           "max": int(sizes_lists.max())},
            "edges": graph.num_edges, "components": int(sizes.shape[0]), "largest_component": int(sizes.max()),
            "rows_in_nontrivial_components": int(sizes[sizes > 1].sum()), "steps": timer.steps,
            "graph_and_components": timer.total(steps)}


def phase_recall(source: MemmapVectors, args: argparse.Namespace) -> dict[str, Any]:
    """The knn phase's index rebuilt (same seed, same lists) in its own process, so the exact search
    it is checked against neither adds to the graph's time nor to its peak RSS."""
    from components.curation.blocked_ivf import build_blocked_ivf
    from components.curation.knn_graph import DEFAULT_BLOCKED_NPROBE, KnnConfig, blocked_settings

    settings = blocked_settings(source.num_rows, KnnConfig(index="ivf_blocked", nlist=args.nlist or None,
                                                           nprobe=args.nprobe or DEFAULT_BLOCKED_NPROBE))
    index = build_blocked_ivf(source, **settings)
    return {**settings, **recall_report(index, args, 64, 0.6)}


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


PHASES = {"knn": phase_knn, "recall": phase_recall, "hkmeans": phase_hkmeans}


def run_phase_here(args: argparse.Namespace) -> None:
    """Child process: one phase; prints its JSON (with this process's peak RSS) as the last line."""
    source = MemmapVectors(Path(args.data))
    load_before = os.getloadavg()
    started, cpu = time.perf_counter(), cpu_seconds()
    result = PHASES[args.phase](source, args)
    result["wall_s"] = round(time.perf_counter() - started, 2)
    result["cpu_s"] = round(cpu_seconds() - cpu, 2)
    result["quiet_wall_estimate_s"] = round(result["cpu_s"] / (os.cpu_count() or 1), 2)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    result["loadavg_before"] = [round(v, 2) for v in load_before]
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))


def run_phase_child(phase: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One phase in a fresh process; a phase that fails (e.g. an API changed under it) is recorded as skipped."""
    command = [sys.executable, __file__, "--phase", phase, "--data", str(data), "--nprobe", str(args.nprobe),
               "--nlist", str(args.nlist), "--n-iter", str(args.n_iter), "--recall-queries", str(args.recall_queries),
               "--resampling-steps", str(args.resampling_steps), "--max-train-rows", str(args.max_train_rows)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    if done.returncode != 0:
        return {"skipped": True, "returncode": done.returncode, "stderr_tail": done.stderr[-2000:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def fit_power_laws(paths: list[Path], target_rows: int) -> dict[str, Any]:
    """Per k-NN step: seconds = a * N^b fitted by least squares on log-log points; peak RSS = c + d * N."""
    runs = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["rows"])
    rows = np.array([r["rows"] for r in runs], dtype=np.float64)
    out: dict[str, Any] = {"from_rows": rows.astype(int).tolist(), "target_rows": target_rows, "steps": {}}
    steps = list(runs[0]["phases"]["knn"]["steps"])
    for step in [*steps, "total"]:
        fits = {}
        for key in ("cpu_s", "wall_s"):
            values = np.array([r["phases"]["knn"]["graph_and_components"][key] if step == "total"
                               else r["phases"]["knn"]["steps"][step][key] for r in runs])
            exponent, log_a = np.polyfit(np.log(rows), np.log(np.maximum(values, 1e-3)), 1)
            fits[key] = {"exponent": round(float(exponent), 3),
                         "at_target": round(float(np.exp(log_a) * target_rows ** exponent), 1)}
        cores = runs[0]["machine"]["cpus"]
        fits["cpu_s"]["quiet_wall_estimate_at_target"] = round(fits["cpu_s"]["at_target"] / cores, 1)
        out["steps"][step] = fits
    rss = np.array([r["phases"]["knn"]["peak_rss_mib"] for r in runs])
    slope, intercept = np.polyfit(rows, rss, 1)
    out["peak_rss_mib"] = {"measured": rss.tolist(), "mib_per_million_rows": round(float(slope) * 1e6, 1),
                           "intercept_mib": round(float(intercept), 1),
                           "at_target": round(float(intercept + slope * target_rows), 1)}
    out["recall"] = {int(r["rows"]): r["phases"].get("recall") for r in runs}
    return out


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
    parser.add_argument("--nlist", type=int, default=0, help="blocked-IVF lists for the k-NN graph; 0: 2*sqrt(N)")
    parser.add_argument("--nprobe", type=int, default=0, help="lists probed per list; 0: the library default")
    parser.add_argument("--recall-queries", type=int, default=10_000, help="rows checked against exact search")
    parser.add_argument("--pool", type=Path, help="reuse this pool .npy (made by generate_pool with seed 0)")
    parser.add_argument("--fit", type=Path, nargs="*", help="fit these per-size results, extrapolate to --rows")
    parser.add_argument("--n-iter", type=int, default=10, help="Lloyd iterations per k-means run")
    parser.add_argument("--resampling-steps", type=int, default=3)
    parser.add_argument("--max-train-rows", type=int, default=200_000, help="level-0 training sample; 0: all")
    parser.add_argument("--phases", default="hkmeans,knn,recall")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "curation_scale.json")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase_here(args)
        return
    if args.fit:
        write_json_atomic(fit_power_laws(args.fit, args.rows), args.out)
        return
    with tempfile.TemporaryDirectory(prefix="curation-scale-") as folder:
        data = args.pool or Path(folder) / "pool.npy"
        started = time.perf_counter()
        if args.pool is None:
            generate_pool(data, args.rows, args.dim, args.modes, seed=0)
        elif np.load(data, mmap_mode="r").shape != (args.rows, args.dim):
            raise SystemExit(f"{data} does not hold {args.rows} x {args.dim} rows")
        report: dict[str, Any] = {
            "rows": args.rows, "dim": args.dim, "modes": args.modes, "command": " ".join(sys.argv[1:]),
            "generate_s": round(time.perf_counter() - started, 2),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]},
            "phases": {},
            "notes": ["peak_rss_mib is ru_maxrss of the phase's own process; it includes the file-backed pages of "
                      "the memory-mapped pool it touched (N x D x 4 bytes when a phase streams every row), which "
                      "the kernel can reclaim, not only anonymous memory",
                      "wall times are on a shared machine: see loadavg_before/after per phase; "
                      "quiet_wall_estimate_s = cpu_s / cpus is an estimate, not a measurement",
                      "generate_s is 0 when --pool reused a pool written earlier by generate_pool (seed 0)"],
        }
        for phase in args.phases.split(","):
            report["phases"][phase] = run_phase_child(phase, data, args)
            write_json_atomic(report, args.out)  # partial results survive a later phase failing
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
