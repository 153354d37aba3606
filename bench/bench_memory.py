"""Peak memory of embedding loading and kNN feature building on 200k x 384 vectors.

Each case runs in a fresh subprocess and reports its peak RSS from its baseline on (VmHWM,
reset at the baseline through /proc/self/clear_refs; ``ru_maxrss`` where that is refused)
against the float32 size of the matrix it produces or consumes (``raw_bytes`` = rows x dim x 4):

* ``cache_gather``: ``EmbeddingCache.encode`` of 200k texts that are all cached, i.e. the
  memory-mapped, shard-by-shard read of float16 shards into one float32 matrix;
* ``naive_concat``: for comparison, loading every shard fully and concatenating;
* ``knn_fit_ivf``: ``KNNFeatureHead.fit`` over the 200k rows with an IVF index (the setting
  for 10^5+ rows): index build, leave-group-out search of every row in batches of 4096,
  neighbour-label features and the widened matrix handed to the base head;
* ``knn_fit_ivf_before``: the same with the kNN code of ``--before-ref`` (default: the commit
  before the chunked, exactly-sized index build), exported with ``git archive`` and imported
  through PYTHONPATH in its subprocess. The two kNN cases alternate ``--repeats`` times; the
  JSON keeps each case's median and the median of the per-repeat ratios.

Usage: ``python bench/bench_memory.py [--rows 200000] [--dim 384] [--repeats 2]
[--cases knn_fit_ivf,knn_fit_ivf_before]``; writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from source_at import export_source

RESULTS = Path(__file__).parent / "results" / "memory.json"
REPO = Path(__file__).resolve().parents[1]
BEFORE_REF = "66951fd"  # main before the kNN memory change: keys copied twice, index grown row by row
SHARD_ROWS = 2048  # the cache's default shard size
MODEL = "embedded:minilm"  # only its identity (cache key) is used; nothing is encoded


def peak_rss_bytes() -> int:
    """The high-water mark since :func:`current_rss_bytes` last reset it (VmHWM), else since
    the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """The RSS now, which becomes the baseline: the peak is reset to it where Linux allows
    (/proc/self/clear_refs), so the set-up before it (loading the vectors, building X next to
    them) does not count as the measured step's working memory."""
    import psutil

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def texts(rows: int) -> list[str]:
    return [f"text {i}" for i in range(rows)]


# -- setup (parent process) ----------------------------------------------------------------------


def write_cache(root: Path, rows: int, dim: int) -> None:
    """Unit vectors as float16 shards of the cache, keyed by the hashes of ``texts(rows)``."""
    from hybridstack.features.embeddings import EmbeddingCache, text_hash, write_shard

    cache = EmbeddingCache(root, MODEL)
    cache.shard_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    hashes = [text_hash(t) for t in texts(rows)]
    for lo in range(0, rows, SHARD_ROWS):
        block = rng.standard_normal((min(SHARD_ROWS, rows - lo), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        write_shard(cache.shard_dir, block.astype(np.float16), hashes[lo:lo + len(block)])


# -- cases (each in a fresh subprocess) ----------------------------------------------------------


def case_cache_gather(root: Path) -> dict:
    from hybridstack.features.embeddings import EmbeddingCache

    cache = EmbeddingCache(root, MODEL)
    names = texts(len(_all_hashes(cache)))
    baseline = current_rss_bytes()
    vectors = cache.encode(names, show_progress=False)
    assert cache.last_stats["n_encoded"] == 0
    return {"raw_bytes": vectors.nbytes, "baseline_rss": baseline}


def case_naive_concat(root: Path) -> dict:
    from hybridstack.features.embeddings import EmbeddingCache

    cache = EmbeddingCache(root, MODEL)
    baseline = current_rss_bytes()
    parts = [np.load(p).astype(np.float32) for p in sorted(cache.shard_dir.glob("*.npy"))]
    vectors = np.concatenate(parts)
    return {"raw_bytes": vectors.nbytes, "baseline_rss": baseline}


def case_knn_fit_ivf(root: Path) -> dict:
    from sklearn.base import BaseEstimator

    from hybridstack.features.embeddings import EmbeddingCache
    from hybridstack.features.knn import KNNFeatureHead

    class WidthHead(BaseEstimator):
        """A base head that only records the width it was given (the kNN part is measured)."""

        def fit(self, X, Y, X_val=None, Y_val=None):
            self.n_features_ = X.shape[1]
            return self

    cache = EmbeddingCache(root, MODEL)
    vectors = cache.encode(texts(len(_all_hashes(cache))), show_progress=False)
    rows = len(vectors)
    groups = np.arange(rows, dtype=np.float32)[:, None]  # every row its own exclusion group
    X = np.hstack([vectors, groups])
    del vectors
    Y = np.eye(3, dtype=np.float32)[np.random.default_rng(0).integers(3, size=rows)]
    baseline = current_rss_bytes()
    started = time.perf_counter()
    head = KNNFeatureHead(WidthHead(), key_stop=X.shape[1] - 1, k=20, index_kind="ivf").fit(X, Y)
    assert head.base_head_.n_features_ == X.shape[1] - 1 + 3 + 2
    return {"raw_bytes": rows * (X.shape[1] - 1) * 4, "baseline_rss": baseline,
            "seconds": round(time.perf_counter() - started, 1)}


def _all_hashes(cache) -> list[str]:
    cache._refresh_shards()
    return list(cache._index)


CASES = {"cache_gather": case_cache_gather, "naive_concat": case_naive_concat,
         "knn_fit_ivf": case_knn_fit_ivf, "knn_fit_ivf_before": case_knn_fit_ivf}
PAIRED = ("knn_fit_ivf", "knn_fit_ivf_before")  # (after, before), alternated over the repeats


def run_case(name: str, root: Path, source: Path) -> dict:
    """Run one case in a fresh interpreter importing hybridstack from ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    out = subprocess.run([sys.executable, __file__, "--case", name, "--root", str(root)],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_over_raw"] = round(result["peak_rss"] / result["raw_bytes"], 2)
    result["work_over_raw"] = round((result["peak_rss"] - result["baseline_rss"]) / result["raw_bytes"], 2)
    return result


def median_case(runs: list[dict]) -> dict:
    """The repeat with the median working memory, and every repeat's ratio."""
    ordered = sorted(runs, key=lambda r: r["work_over_raw"])
    return {**ordered[(len(ordered) - 1) // 2], "repeats_work_over_raw": [r["work_over_raw"] for r in runs]}


def print_case(name: str, r: dict) -> None:
    print(f"{name:>18}: peak RSS {r['peak_rss'] / 2**20:7.0f} MiB = {r['peak_over_raw']:.2f} x raw "
          f"({r['raw_bytes'] / 2**20:.0f} MiB); above the {r['baseline_rss'] / 2**20:.0f} MiB "
          f"baseline: {r['work_over_raw']:.2f} x raw", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the two kNN cases")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to run")
    parser.add_argument("--before-ref", default=BEFORE_REF, help="git ref of the 'before' kNN code")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child: measure one case and print it as JSON
        result = CASES[args.case](Path(args.root))
        result["peak_rss"] = peak_rss_bytes()
        print(json.dumps(result))
        return

    wanted = args.cases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        sources = {name: REPO for name in CASES}
        sources["knn_fit_ivf_before"] = export_source(args.before_ref, Path(tmp) / "before")
        started = time.perf_counter()
        write_cache(root, args.rows, args.dim)
        print(f"wrote {args.rows} x {args.dim} float16 shards in {time.perf_counter() - started:.1f}s")
        results = {}
        for name in [n for n in CASES if n in wanted and n not in PAIRED]:
            results[name] = run_case(name, root, sources[name])
            print_case(name, results[name])
        paired = [n for n in PAIRED if n in wanted]
        runs: dict[str, list[dict]] = {n: [] for n in paired}
        for rep in range(args.repeats if paired else 0):
            for name in paired if rep % 2 == 0 else paired[::-1]:  # interleaved, order alternating
                runs[name].append(run_case(name, root, sources[name]))
                print_case(f"{name}#{rep}", runs[name][-1])
        results.update({name: median_case(r) for name, r in runs.items()})
    summary = {"rows": args.rows, "dim": args.dim, "shard_rows": SHARD_ROWS, "cases": results,
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}}
    if {"naive_concat", "cache_gather"} <= results.keys():
        ratio = results["naive_concat"]["work_over_raw"] / results["cache_gather"]["work_over_raw"]
        summary["naive_over_gather_working_memory"] = round(ratio, 2)
        print(f"memory-mapped gather needs {ratio:.2f}x less working memory than load-and-concatenate")
    if len(paired) == 2:
        after, before = runs["knn_fit_ivf"], runs["knn_fit_ivf_before"]
        ratios = [b["work_over_raw"] / a["work_over_raw"] for a, b in zip(after, before, strict=True)]
        summary["knn_fit"] = {"before_ref": args.before_ref,
                              "before_over_after_working_memory": round(statistics.median(ratios), 2),
                              "before_over_after_seconds": round(statistics.median(
                                  [b["seconds"] / a["seconds"] for a, b in zip(after, before, strict=True)]), 2)}
        print(f"kNN fit: {summary['knn_fit']['before_over_after_working_memory']:.2f}x less working "
              f"memory than {args.before_ref}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
