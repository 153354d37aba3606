"""Content-addressed sentence-embedding cache, shared by every experiment in a workdir.

Layout under ``cache_root``::

    <key>/                      one folder per encoder setting (model weights, max length,
      manifest.json             prefix, normalize, dtype); the manifest holds those in words
      shards/
        <stem>.npy              (rows, dim) vectors, float16 or float32
        <stem>.json             written last: row count, dtype, checksum, the text hashes

A shard becomes visible only when its ``.json`` exists, and both files are renamed into
place from temporary names, so a killed run loses at most the shard it was encoding.
Shards are never modified; stems hold time, pid and a random part, so several processes
can append to one folder at once. Rows are keyed by a hash of the exact text (the prefix
is part of the folder key, not of the text hash). Reading is memory-mapped and checks
each shard's size and checksum first: a damaged shard is reported, removed and its texts
are encoded again.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hybridstack.errors import HybridstackError
from hybridstack.features.multi_encode import (
    encode_devices,
    encode_on_pool,
    encoding_pool,
    is_multi_process,
)
from hybridstack.models import EMBEDDED_MINILM, resolve_model
from hybridstack.progress import progress
from hybridstack.runs import read_json, write_bytes, write_json
from hybridstack.tables import file_sha256
from hybridstack.versions import library_versions

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from hybridstack.config import Config

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the on-disk layout changes; it is part of every key
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
DEFAULT_SHARD_ROWS = 2048  # small enough that a kill loses little, large enough to keep file counts low
GATHER_ROWS = 65_536  # rows copied out of one memory map at a time (bounds temporary memory)
# Files in a model folder that do not change what it computes.
_MODEL_DOC_SUFFIXES = (".md", ".gitattributes")
_MODEL_SKIP_DIRS = {".git", "onnx", "openvino"}
_STEM_PID = re.compile(r"^\.?[0-9a-f]+-(\d+)-[0-9a-f]+")


# -- hashing -----------------------------------------------------------------------------------


def text_hash(text: str) -> str:
    """Hex digest (32 chars) identifying one exact text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def model_fingerprint(folder: Path) -> str:
    """SHA-256 over the relative names and contents of a model folder's files.

    Two folders with the same name but other weights (or tokenizer, pooling config) get
    different fingerprints; the same files copied elsewhere get the same one.
    Documentation and alternative-backend exports (onnx/, openvino/) are left out.
    Memoized per process on the files' sizes and modification times.
    """
    files = tuple(sorted(_model_files(folder)))
    stats = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(folder, files, stats)


@functools.lru_cache(maxsize=16)
def _fingerprint(folder: Path, files: tuple[Path, ...], stats: tuple[tuple[int, int], ...]) -> str:
    # ``stats`` is only part of the memo key: an edited file gets a fresh digest
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _model_files(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder, followlinks=True):  # the HF cache uses symlinks
        dirs[:] = sorted(d for d in dirs if d not in _MODEL_SKIP_DIRS)
        for name in files:
            if not name.endswith(_MODEL_DOC_SUFFIXES):
                yield Path(root) / name


def _model_slug(name: str, folder: Path) -> str:
    """A readable prefix for the cache folder name, e.g. ``e5-small-v2``."""
    if name == EMBEDDED_MINILM:
        base = "minilm"
    elif Path(name).expanduser().is_dir():
        base = folder.name
    else:
        base = name.rstrip("/").split("/")[-1]
    return re.sub(r"[^a-z0-9._]+", "-", base.lower()).strip("-.")[:40] or "model"


# -- shards ------------------------------------------------------------------------------------


class CorruptShard(Exception):
    """A shard whose files do not match its record (truncated, damaged or missing)."""


@dataclass
class Shard:
    """One committed shard: its record (``.json``) and vectors (``.npy``)."""

    record_path: Path
    rows: int
    dim: int
    dtype: str
    vectors_sha256: str
    vectors_bytes: int
    hashes: list[str]

    @property
    def vectors_path(self) -> Path:
        return self.record_path.with_suffix(".npy")

    @classmethod
    def read(cls, record_path: Path) -> Shard:
        """Parse a shard record; raises :class:`CorruptShard` when it is malformed."""
        try:
            record = read_json(record_path)
            shard = cls(
                record_path=record_path, rows=int(record["rows"]), dim=int(record["dim"]),
                dtype=str(record["dtype"]), vectors_sha256=str(record["vectors_sha256"]),
                vectors_bytes=int(record["vectors_bytes"]), hashes=list(record["hashes"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorruptShard(f"unreadable record ({type(err).__name__}: {err})") from None
        if len(shard.hashes) != shard.rows:
            raise CorruptShard(f"record lists {len(shard.hashes)} hashes for {shard.rows} rows")
        return shard

    def verify(self, dtype: str) -> None:
        """Check the vectors file against the record: size, checksum, then the npy header."""
        path = self.vectors_path
        try:
            size = path.stat().st_size
            if size != self.vectors_bytes:
                raise CorruptShard(f"{size} bytes on disk, record says {self.vectors_bytes}")
            if file_sha256(path) != self.vectors_sha256:
                raise CorruptShard("checksum mismatch")
            vectors = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise CorruptShard(f"unreadable vectors ({type(err).__name__}: {err})") from None
        if vectors.shape != (self.rows, self.dim) or vectors.dtype != np.dtype(dtype):
            raise CorruptShard(f"vectors are {vectors.dtype}{vectors.shape}, expected "
                               f"{dtype}({self.rows}, {self.dim})")

    def open(self) -> np.ndarray:
        """The vectors as a read-only memory map, shape (rows, dim)."""
        return np.load(self.vectors_path, mmap_mode="r")


def write_shard(shard_dir: Path, vectors: np.ndarray, hashes: list[str]) -> Shard:
    """Write one shard: vectors first, then its record, each via temp name + rename.

    The stem (hex time, pid, random) is unique across processes, and readers only see a
    shard once its record exists, so concurrent writers never see each other's half files.
    """
    stem = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    payload = buffer.getvalue()
    shard = Shard(
        record_path=shard_dir / f"{stem}.json", rows=len(vectors), dim=vectors.shape[1],
        dtype=str(vectors.dtype), vectors_sha256=hashlib.sha256(payload).hexdigest(),
        vectors_bytes=len(payload), hashes=hashes,
    )
    write_bytes(shard.vectors_path, payload)
    write_json(shard.record_path, {
        "rows": shard.rows, "dim": shard.dim, "dtype": shard.dtype,
        "vectors_sha256": shard.vectors_sha256, "vectors_bytes": shard.vectors_bytes,
        "hashes": hashes,
    })
    return shard


def writer_pid(name: str) -> int | None:
    """The pid in a shard file name (also inside ``.<stem>.npy.XXXX.tmp``), if any."""
    match = _STEM_PID.match(name)
    return int(match.group(1)) if match else None


# -- the cache ---------------------------------------------------------------------------------


class EmbeddingCache:
    """Sentence embeddings computed once per (encoder setting, exact text) and kept on disk.

    Parameters
    ----------
    cache_root : str or Path
        Folder shared by all experiments (``<workdir>/cache/embeddings`` by default).
    model : str
        Hub id (resolved offline), local folder, or ``"embedded:minilm"``.
    max_seq_length : int
        Tokens kept per text; part of the key.
    prefix : str
        Prepended to every text before encoding (e.g. ``"query: "`` for e5); part of the key.
    normalize : bool
        L2-normalize the vectors; part of the key.
    dtype : {"float16", "float32"}
        Storage precision; vectors are always returned as float32. Part of the key.
    batch_size : int
        Encoder batch size (not part of the key).
    device : str or None
        Torch device for encoding in this process; None lets sentence-transformers choose
        (and lets two or more visible GPUs be used, one worker process each).
    devices : str, sequence of str or None
        Devices to spread encoding over, one worker process each (``["cuda:0", "cuda:1"]``,
        ``"cpu,cpu"``). None: the environment variable ``HYBRIDSTACK_ENCODE_DEVICES``
        (same format), else every visible GPU when there are two or more and ``device`` is
        None, else one process. See :mod:`hybridstack.features.multi_encode`. Not part of
        the key: every device writes the same vectors (to float rounding).
    shard_rows : int
        Texts encoded and written per shard.
    read_only_roots : sequence of Path
        Caches read but never written (an attached Kaggle dataset): texts found there are
        not encoded again; new ones go to ``cache_root``.

    Attributes
    ----------
    last_stats : dict
        After :meth:`encode`: ``n_texts``, ``n_unique``, ``n_cached``, ``n_encoded``, ``seconds``.
    """

    def __init__(
        self,
        cache_root: str | Path,
        model: str,
        *,
        max_seq_length: int = 512,
        prefix: str = "",
        normalize: bool = True,
        dtype: Literal["float32", "float16"] = "float16",
        batch_size: int = 64,
        device: str | None = None,
        devices: str | Sequence[str] | None = None,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        read_only_roots: Sequence[str | Path] = (),
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise HybridstackError(f"embed.dtype: {dtype!r} is not supported; use float16 or float32")
        self.cache_root = Path(cache_root)
        self.model_name = model
        self.model_path = resolve_model(model, "embed.model")
        _check_max_length(self.model_path, max_seq_length)
        self.max_seq_length = max_seq_length
        self.prefix = prefix
        self.normalize = normalize
        self.dtype = dtype
        self.batch_size = batch_size
        self.device = device
        self.devices = devices
        self.shard_rows = shard_rows
        self.read_only_roots = [Path(r) for r in read_only_roots if Path(r) != self.cache_root]
        self.last_stats: dict[str, Any] = {}
        self._key: str | None = None
        self._model_sha256: str | None = None
        self._model: SentenceTransformer | None = None
        self._shards: dict[str, Shard] = {}  # record file name -> parsed record
        self._index: dict[str, tuple[str, int]] = {}  # text hash -> (record name, row)
        self._verified: set[str] = set()  # record names whose vectors passed verify()

    # -- identity --------------------------------------------------------------------------

    @property
    def model_sha256(self) -> str:
        if self._model_sha256 is None:
            self._model_sha256 = model_fingerprint(self.model_path)
        return self._model_sha256

    def key_parts(self) -> dict[str, Any]:
        """What the key is a hash of; recorded in words in ``manifest.json``."""
        return {
            "format": CACHE_FORMAT,
            "model_sha256": self.model_sha256,
            "max_seq_length": self.max_seq_length,
            "prefix": self.prefix,
            "normalize": self.normalize,
            "dtype": self.dtype,
        }

    @property
    def key(self) -> str:
        """The cache folder's name: ``<model slug>-<16 hex digits of the key parts>``."""
        if self._key is None:
            blob = json.dumps(self.key_parts(), sort_keys=True).encode()
            digest = hashlib.sha256(blob).hexdigest()[:16]
            self._key = f"{_model_slug(self.model_name, self.model_path)}-{digest}"
        return self._key

    @property
    def folder(self) -> Path:
        return self.cache_root / self.key

    @property
    def shard_dir(self) -> Path:
        return self.folder / SHARDS_DIR

    def _shard_dirs(self) -> list[Path]:
        """Where shards are read from: the writable cache first, then the read-only layers."""
        return [self.shard_dir, *(root / self.key / SHARDS_DIR for root in self.read_only_roots)]

    @property
    def dim(self) -> int:
        """Embedding width; read from a manifest when the cache exists, else from the model."""
        for shard_dir in self._shard_dirs():
            manifest = shard_dir.parent / MANIFEST_FILE
            if manifest.is_file():
                try:
                    return int(read_json(manifest)["dim"])
                except (OSError, ValueError, KeyError, TypeError):
                    pass  # a damaged manifest is rewritten on the next encode; ask the model
        return _embedding_dim(self._encoder())

    # -- encoding --------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], *, show_progress: bool = True) -> np.ndarray:
        """Embeddings of ``texts``, encoding only those not cached yet.

        Parameters
        ----------
        texts : sequence of str, length n
        show_progress : bool
            Show a progress bar while encoding.

        Returns
        -------
        np.ndarray, float32, shape (n, dim)
            Row i belongs to ``texts[i]``. Every row is read back from the cache, so a
            text gets the same vector whether it was cached or just encoded.
        """
        start = time.perf_counter()
        texts = list(texts)  # positional access even for a pandas Series with its own index
        hashes = [text_hash(_check_text(t, i)) for i, t in enumerate(texts)]
        first_of: dict[str, int] = {}  # unique hash -> index of its first occurrence
        for i, h in enumerate(hashes):
            first_of.setdefault(h, i)
        location = self._locate(set(first_of))
        missing = [h for h in first_of if h not in location]
        if missing:
            new = self._encode_missing([texts[first_of[h]] for h in missing], missing, show_progress)
            location.update(new)
        vectors = self._gather([location[h] for h in hashes])
        self.last_stats = {
            "n_texts": len(texts), "n_unique": len(first_of),
            "n_cached": len(first_of) - len(missing), "n_encoded": len(missing),
            "seconds": round(time.perf_counter() - start, 3),
        }
        log.info("embeddings: %d texts, %d unique, %d cached, %d encoded", len(texts),
                 len(first_of), len(first_of) - len(missing), len(missing))
        return vectors

    def _encode_missing(self, texts: list[str], hashes: list[str],
                        show_progress: bool) -> dict[str, tuple[str, int]]:
        """Encode ``texts`` shard by shard; return where each hash now lives.

        With several devices (see :class:`EmbeddingCache`, ``devices``) one pool of worker
        processes encodes every shard; this process still writes the shards, so they are
        committed atomically as in the single-process path.
        """
        devices = encode_devices(self.devices, self.device)
        multi = is_multi_process(devices)
        single_device = None if multi or devices is None else devices[0]
        # A pool's workers each copy the model from the CPU: load it there, not on cuda:0
        model = self._encoder(load_on="cpu" if multi else single_device)
        self._write_manifest(_embedding_dim(model))
        # Longest first across all shards (as encode() does inside one call), so chunking
        # does not mix short and long texts in a batch and waste padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        location: dict[str, tuple[str, int]] = {}
        with (progress(total=len(texts), desc="encoding", unit="texts", disable=not show_progress) as bar,
              encoding_pool(model, devices) as pool):
            for lo in range(0, len(order), self.shard_rows):
                chunk = order[lo:lo + self.shard_rows]
                vectors = self._encode_chunk(model, [self.prefix + texts[i] for i in chunk],
                                             pool, single_device)
                shard = write_shard(self.shard_dir, self._to_storage(vectors),
                                    [hashes[i] for i in chunk])
                self._add_shard(shard)
                self._verified.add(shard.record_path.name)  # written by us just now
                location.update((h, (shard.record_path.name, row)) for row, h in enumerate(shard.hashes))
                bar.update(len(chunk))
        return location

    def _encode_chunk(self, model: SentenceTransformer, texts: list[str], pool: Any,
                      device: str | None) -> np.ndarray:
        """One shard's vectors: through the worker pool, or here (on ``device`` when given)."""
        if pool is not None:
            return encode_on_pool(model, pool, texts, batch_size=self.batch_size,
                                  normalize=self.normalize)
        placement = {"device": device} if device else {}  # None: wherever the model was loaded
        return model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                            normalize_embeddings=self.normalize, show_progress_bar=False,
                            **placement)

    def _to_storage(self, vectors: np.ndarray) -> np.ndarray:
        stored = np.ascontiguousarray(vectors, dtype=self.dtype)
        if not np.isfinite(stored).all():
            raise HybridstackError(
                f"embed.model {self.model_name}: non-finite vectors (overflow in {self.dtype}); "
                "set embed.normalize = true or embed.dtype = \"float32\""
            )
        return stored

    def _encoder(self, load_on: str | None = None) -> SentenceTransformer:
        """The SentenceTransformer, loaded on first use (a warm cache never loads it).

        ``load_on`` overrides ``self.device`` for that first load only.
        """
        if self._model is None:
            self._model = _load_model(self.model_path, load_on or self.device)
        # Set on every use: the object may be shared with a cache of another max length.
        self._model.max_seq_length = self.max_seq_length
        return self._model

    def _write_manifest(self, dim: int) -> None:
        """Write manifest.json unless an intact one is there (concurrent writers agree on it)."""
        path = self.folder / MANIFEST_FILE
        try:
            if read_json(path)["key"] == self.key:
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or damaged: (re)write it
        write_json(path, {
            "key": self.key, **self.key_parts(), "model": self.model_name,
            "model_path": str(self.model_path), "dim": dim,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(),
        })

    # -- reading ---------------------------------------------------------------------------

    def _locate(self, wanted: set[str]) -> dict[str, tuple[str, int]]:
        """(shard record name, row) of every wanted hash held by an intact shard.

        Shards holding wanted rows are verified (once per instance); a damaged one is
        reported, removed, and its rows count as missing.
        """
        self._refresh_shards()
        while True:  # each pass removes at least one damaged shard, so this ends
            location = {h: self._index[h] for h in wanted if h in self._index}
            needed = sorted({name for name, _ in location.values()} - self._verified)
            if all(self._verify(name) for name in needed):
                return location

    def _refresh_shards(self) -> None:
        """Index records that appeared since the last call (other processes may append).

        Record names are unique (time, pid, random part), so the layers share one index.
        """
        on_disk: dict[str, Path] = {}
        for shard_dir in reversed(self._shard_dirs()):  # the writable layer wins a tie
            if shard_dir.is_dir():
                on_disk.update((p.name, p) for p in shard_dir.glob("*.json"))
        for name in sorted(on_disk.keys() - self._shards.keys()):
            try:
                self._add_shard(Shard.read(on_disk[name]))
            except CorruptShard as err:
                self._discard(on_disk[name], str(err))
        gone = self._shards.keys() - on_disk  # pruned meanwhile
        if gone:
            self._drop_shards(gone)

    def _add_shard(self, shard: Shard) -> None:
        name = shard.record_path.name
        self._shards[name] = shard
        for row, h in enumerate(shard.hashes):
            self._index.setdefault(h, (name, row))  # a text two writers both encoded: keep one

    def _drop_shards(self, names: set[str]) -> None:
        for name in names:
            del self._shards[name]
            self._verified.discard(name)
        remaining = list(self._shards.values())  # rare (damage, prune): rebuild the index
        self._shards, self._index = {}, {}
        for shard in remaining:
            self._add_shard(shard)

    def _verify(self, name: str) -> bool:
        shard = self._shards[name]
        try:
            shard.verify(self.dtype)
        except CorruptShard as err:
            self._discard(shard.record_path, str(err))
            self._drop_shards({name})
            return False
        self._verified.add(name)
        return True

    def _discard(self, record_path: Path, reason: str) -> None:
        log.warning("embedding cache: corrupt shard %s (%s); removed, its texts will be "
                    "encoded again", record_path.with_suffix(".npy"), reason)
        try:
            record_path.unlink(missing_ok=True)  # record first: a lone vectors file is ignored
            record_path.with_suffix(".npy").unlink(missing_ok=True)
        except OSError as err:  # a read-only cache (e.g. a Kaggle dataset): skip it in memory only
            log.warning("embedding cache: cannot remove %s: %s", record_path, err.strerror)

    def _gather(self, places: list[tuple[str, int]]) -> np.ndarray:
        """Rows at ``places`` (one per output row) as float32 (n, dim), shard by shard."""
        if not places:
            return np.empty((0, self.dim), dtype=np.float32)
        names = sorted({name for name, _ in places})
        shard_no = {name: k for k, name in enumerate(names)}
        shard_of = np.fromiter((shard_no[name] for name, _ in places), np.int64, len(places))
        row_of = np.fromiter((row for _, row in places), np.int64, len(places))
        order = np.lexsort((row_of, shard_of))  # read each map front to back
        bounds = np.searchsorted(shard_of[order], np.arange(len(names) + 1))
        out = np.empty((len(places), self._shards[names[0]].dim), dtype=np.float32)
        for k, name in enumerate(names):
            vectors = self._shards[name].open()
            positions = order[bounds[k]:bounds[k + 1]]
            for lo in range(0, len(positions), GATHER_ROWS):
                batch = positions[lo:lo + GATHER_ROWS]
                out[batch] = vectors[row_of[batch]]
            del vectors  # close the map before opening the next one
        return out


def _check_text(text: object, position: int) -> str:
    if not isinstance(text, str):
        raise HybridstackError(
            f"embeddings: text {position} is {type(text).__name__}, not str; render missing "
            "fields as \"\" before encoding"
        )
    return text


def _check_max_length(model_path: Path, max_seq_length: int) -> None:
    """Fail early, not with a tensor-size error mid-encoding, when the model has fewer positions."""
    try:
        positions = read_json(model_path / "config.json").get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return  # no readable transformer config at the top: sentence-transformers decides
    if isinstance(positions, int) and max_seq_length > positions:
        raise HybridstackError(
            f"embed.max_seq_length: {max_seq_length} exceeds the {positions} positions of "
            f"{model_path}; set embed.max_seq_length to {positions} or less"
        )


def _embedding_dim(model: SentenceTransformer) -> int:
    # sentence-transformers 6 renamed get_sentence_embedding_dimension; 5.x has only the old name
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def _load_model(path: Path, device: str | None) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    log.info("loading sentence encoder %s", path)
    return SentenceTransformer(str(path), device=device, local_files_only=True)


def embed_cache_from_config(cfg: Config) -> EmbeddingCache:
    """The :class:`EmbeddingCache` for ``cfg.embed`` under ``cfg.embedding_cache_dir``."""
    embed = cfg.embed
    return EmbeddingCache(
        cfg.embedding_cache_dir, embed.model, max_seq_length=embed.max_seq_length,
        prefix=embed.prefix, normalize=embed.normalize, dtype=embed.dtype,
        batch_size=embed.batch_size,
    )


# -- inspection and clean-up (``hybridstack cache``) ------------------------------------------


@dataclass
class CacheFolder:
    """One key folder as found on disk."""

    path: Path
    manifest: dict[str, Any] | None  # None when missing or unreadable
    rows: int
    shards: int
    n_bytes: int

    def matches(self, text: str) -> bool:
        """True when ``text`` occurs (case-insensitively) in the key, model name or path."""
        fields = [self.path.name, *(str((self.manifest or {}).get(k, "")) for k in ("model", "model_path"))]
        return any(text.lower() in field.lower() for field in fields)


def scan_cache(cache_root: str | Path) -> list[CacheFolder]:
    """Every key folder under ``cache_root``, sorted by name (shard records are parsed)."""
    root = Path(cache_root)
    if not root.is_dir():
        return []
    folders = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            manifest = read_json(path / MANIFEST_FILE)
        except (OSError, ValueError):
            manifest = None
        rows = shards = 0
        for record in sorted((path / SHARDS_DIR).glob("*.json")):
            try:
                rows += Shard.read(record).rows
                shards += 1
            except CorruptShard:
                continue  # reported and removed by the next reader, not by a listing
        n_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        folders.append(CacheFolder(path, manifest, rows, shards, n_bytes))
    return folders


def stray_files(folder: Path, min_age_s: float = 3600.0) -> list[Path]:
    """Leftovers of killed writers in one key folder: temp files and uncommitted vectors.

    A file whose name carries a writer pid is stray once that process is gone; other
    temp files (the manifest's) once they are ``min_age_s`` old. Files of a writer that
    is still running are never listed, so pruning beside a running encode is safe.
    """
    shard_dir = folder / SHARDS_DIR
    candidates = list(folder.glob("*.tmp"))
    if shard_dir.is_dir():
        candidates += [p for p in shard_dir.iterdir() if p.name.endswith(".tmp")
                       or (p.suffix == ".npy" and not p.with_suffix(".json").exists())]
    now = time.time()
    stray = []
    for path in sorted(candidates):
        pid = writer_pid(path.name)
        if pid is None:
            try:
                if now - path.stat().st_mtime >= min_age_s:
                    stray.append(path)
            except FileNotFoundError:  # renamed into place meanwhile
                continue
        elif not _process_alive(pid):
            stray.append(path)
    return stray


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
