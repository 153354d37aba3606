"""Benchmark encoding in one process against a pool of worker processes, side by side.

    python bench/bench_multi_encode.py [--rows N] [--repeats R] [--devices cuda:0,cuda:1]

Each repeat encodes the same unique texts into two empty caches: once in this process on
the first device, once through EmbeddingCache's worker pool on ``--devices`` (default:
every visible GPU, else ``cpu,cpu``); the order alternates between repeats, and the
median ratio of the times is the speed-up. The pool's start-up (spawning workers, copying
the model) is inside the timing, as it is in every ``embed`` run. Both paths share one
loaded model. The vectors of the two paths are compared as well.

Texts: comment_text of /work/shared/data/jigsaw-toxic-10k/train.csv; model: MiniLM
(embedded:minilm), max_seq_length 128. Results go to bench/results/multi_encode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_embed_cache import BATCH_SIZE, DATA, MAX_SEQ_LENGTH, load_texts  # noqa: E402

from hybridstack.features import embeddings  # noqa: E402
from hybridstack.features.embeddings import EmbeddingCache  # noqa: E402
from hybridstack.features.multi_encode import parse_devices  # noqa: E402
from hybridstack.models import EMBEDDED_MINILM, embedded_minilm_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "multi_encode.json"


def default_devices() -> list[str]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] if count >= 2 else ["cpu", "cpu"]


def timed_encode(root: Path, texts: list[str], devices: list[str], shard_rows: int):
    cache = EmbeddingCache(root, EMBEDDED_MINILM, max_seq_length=MAX_SEQ_LENGTH,
                           batch_size=BATCH_SIZE, dtype="float32", devices=devices,
                           shard_rows=shard_rows)
    start = time.perf_counter()
    vectors = cache.encode(texts, show_progress=False)
    return time.perf_counter() - start, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="unique texts per encode")
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs of runs")
    parser.add_argument("--devices", default=None, help="pool devices, e.g. cuda:0,cuda:1")
    parser.add_argument("--shard-rows", type=int, default=embeddings.DEFAULT_SHARD_ROWS)
    args = parser.parse_args()
    pool_devices = parse_devices(args.devices or "") or default_devices()
    single = [pool_devices[0]]

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(embedded_minilm_path()), device=single[0])
    embeddings._load_model = lambda path, device: model  # one loaded model for both paths
    texts = load_texts(DATA, args.rows)
    model.encode(texts[:BATCH_SIZE], batch_size=BATCH_SIZE)  # warm up kernels and the tokenizer

    times: dict[str, list[float]] = {"single": [], "pool": []}
    max_diff = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            runs = [("single", single), ("pool", pool_devices)]
            got = {}
            for name, devices in runs if rep % 2 == 0 else runs[::-1]:
                seconds, got[name] = timed_encode(Path(tmp) / f"{name}_{rep}", texts, devices,
                                                  args.shard_rows)
                times[name].append(seconds)
            max_diff = max(max_diff, float(np.abs(got["single"] - got["pool"]).max()))
    ratios = [s / p for s, p in zip(times["single"], times["pool"], strict=True)]
    results = {
        "data": str(DATA), "model": "all-MiniLM-L6-v2 (embedded:minilm)", "rows": len(texts),
        "max_seq_length": MAX_SEQ_LENGTH, "batch_size": BATCH_SIZE, "shard_rows": args.shard_rows,
        "single_device": single[0], "pool_devices": pool_devices,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "single_s": times["single"], "pool_s": times["pool"],
        "texts_per_s_single": len(texts) / statistics.median(times["single"]),
        "texts_per_s_pool": len(texts) / statistics.median(times["pool"]),
        "median_speedup": statistics.median(ratios), "max_abs_diff": max_diff,
    }
    print(f"{len(texts)} texts: one process on {single[0]} "
          f"{results['texts_per_s_single']:.1f} texts/s, pool on {','.join(pool_devices)} "
          f"{results['texts_per_s_pool']:.1f} texts/s -> median speed-up "
          f"{results['median_speedup']:.2f}x; max |diff| {max_diff:.1e}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
