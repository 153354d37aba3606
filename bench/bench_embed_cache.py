"""Benchmark the embedding cache against bare SentenceTransformer.encode, side by side.

    python bench/bench_embed_cache.py [--rows N] [--scale-rows M]

(a) cold overhead: the cached path (hash, shard, write, read back) vs a bare encode of
    the same unique texts; repeated, alternating order, best of each (target <= 5%).
(b) warm vs cold: a fresh EmbeddingCache reading the same texts back vs encoding them.
(c) de-duplication: every unique text appears 3 times (LMSYS repeats prompts);
    bare encode of all rows vs the cached path on an empty cache.
(d) scale: a synthetic cache of M x 384 float16 rows read back through the memory maps;
    peak Python/numpy heap vs the size of the returned float32 matrix.

Texts: comment_text of /work/shared/data/jigsaw-toxic-10k/train.csv; model: MiniLM
(embedded:minilm), max_seq_length 128, CPU. Both paths share one loaded model, so only
encoding is timed. Results go to bench/results/embed_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hybridstack.features import embeddings  # noqa: E402
from hybridstack.features.embeddings import EmbeddingCache, text_hash, write_shard  # noqa: E402
from hybridstack.models import EMBEDDED_MINILM, embedded_minilm_path  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "jigsaw-toxic-10k" / "train.csv"
RESULTS = Path(__file__).resolve().parent / "results" / "embed_cache.json"
MAX_SEQ_LENGTH = 128
BATCH_SIZE = 64
SEED = 42


def load_texts(path: Path, rows: int) -> list[str]:
    comments = pd.read_csv(path, usecols=["comment_text"], dtype=str, keep_default_na=False)
    unique = list(dict.fromkeys(comments["comment_text"]))
    random.Random(SEED).shuffle(unique)
    return unique[:rows]


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def new_cache(root: Path) -> EmbeddingCache:
    return EmbeddingCache(root, EMBEDDED_MINILM, max_seq_length=MAX_SEQ_LENGTH,
                          batch_size=BATCH_SIZE)


def bare_encode(model, texts: list[str]) -> np.ndarray:
    return model.encode(texts, batch_size=BATCH_SIZE, convert_to_numpy=True,
                        normalize_embeddings=True, show_progress_bar=False)


def cold_overhead(model, texts: list[str], work: Path, repeats: int) -> dict:
    bare, cached = [], []
    for rep in range(repeats):
        root = work / f"cold_{rep}"
        runs = [("bare", lambda: bare_encode(model, texts)),
                ("cached", lambda root=root: new_cache(root).encode(texts, show_progress=False))]
        for name, action in runs if rep % 2 == 0 else runs[::-1]:
            (bare if name == "bare" else cached).append(timed(action)[0])
    return {"bare_s": bare, "cached_s": cached,
            "overhead_pct": 100 * (min(cached) / min(bare) - 1),
            "texts_per_s_bare": len(texts) / min(bare), "texts_per_s_cached": len(texts) / min(cached)}


def warm_vs_cold(texts: list[str], work: Path) -> dict:
    root = work / "warm"
    cold_s, _ = timed(lambda: new_cache(root).encode(texts, show_progress=False))
    warm_s, _ = timed(lambda: new_cache(root).encode(texts, show_progress=False))
    return {"cold_s": cold_s, "warm_s": warm_s, "cold_over_warm": cold_s / warm_s}


def dedup_speedup(model, texts: list[str], work: Path) -> dict:
    unique = texts[: max(1, len(texts) // 3)]
    repeated = unique * 3
    random.Random(SEED).shuffle(repeated)
    bare_s, _ = timed(lambda: bare_encode(model, repeated))
    cache = new_cache(work / "dedup")
    cached_s, _ = timed(lambda: cache.encode(repeated, show_progress=False))
    return {"rows": len(repeated), "unique": len(unique), "bare_s": bare_s, "cached_s": cached_s,
            "speedup": bare_s / cached_s, "stats": cache.last_stats}


def scale_read(rows: int, work: Path, dim: int = 384, shard_rows: int = 4096) -> dict:
    """Fill a cache with random unit vectors, then time and heap-profile reading them all."""
    cache = new_cache(work / "scale")
    texts = [f"synthetic text {i}" for i in range(rows)]
    rng = np.random.default_rng(SEED)
    cache.shard_dir.mkdir(parents=True)
    for lo in range(0, rows, shard_rows):
        block = rng.standard_normal((min(shard_rows, rows - lo), dim)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        write_shard(cache.shard_dir, block.astype(np.float16),
                    [text_hash(t) for t in texts[lo:lo + shard_rows]])
    reader = new_cache(work / "scale")
    read_s, vectors = timed(lambda: reader.encode(texts, show_progress=False))
    assert reader.last_stats["n_encoded"] == 0
    del vectors
    tracemalloc.start()  # a second, fresh reader: tracing slows Python code, so it is not timed
    vectors = new_cache(work / "scale").encode(texts, show_progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"rows": rows, "dim": dim, "read_s": read_s, "rows_per_s": rows / read_s,
            "output_mb": vectors.nbytes / 2**20, "peak_heap_mb": peak / 2**20,
            "peak_heap_over_output": peak / vectors.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=450, help="unique texts for (a)-(c)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs in (a)")
    parser.add_argument("--scale-rows", type=int, default=200_000, help="rows for (d)")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(embedded_minilm_path()), device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    embeddings._load_model = lambda path, device: model  # one loaded model for both paths
    texts = load_texts(DATA, args.rows)
    bare_encode(model, texts[:64])  # warm up kernels and the tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {
            "data": str(DATA), "model": "all-MiniLM-L6-v2 (embedded:minilm)",
            "max_seq_length": MAX_SEQ_LENGTH, "batch_size": BATCH_SIZE, "rows": len(texts),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
            "cold_overhead": cold_overhead(model, texts, work, args.repeats),
            "warm_vs_cold": warm_vs_cold(texts, work),
            "dedup": dedup_speedup(model, texts, work),
            "scale": scale_read(args.scale_rows, work),
        }
    a, b, c, d = (results[k] for k in ("cold_overhead", "warm_vs_cold", "dedup", "scale"))
    print(f"(a) cold: bare {a['texts_per_s_bare']:.1f} texts/s, cached {a['texts_per_s_cached']:.1f} "
          f"texts/s -> overhead {a['overhead_pct']:+.1f}% (target <= 5%)")
    print(f"(b) warm read {b['warm_s']:.3f}s vs cold encode {b['cold_s']:.1f}s -> "
          f"{b['cold_over_warm']:.0f}x faster")
    print(f"(c) {c['rows']} rows, {c['unique']} unique: bare {c['bare_s']:.1f}s, cached "
          f"{c['cached_s']:.1f}s -> {c['speedup']:.2f}x")
    print(f"(d) {d['rows']} x {d['dim']} float16 read in {d['read_s']:.2f}s; peak heap "
          f"{d['peak_heap_mb']:.0f} MB for a {d['output_mb']:.0f} MB result "
          f"({d['peak_heap_over_output']:.2f}x)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
