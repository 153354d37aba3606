"""Leak-free k-nearest-neighbour label features over embeddings (faiss).

For every row: the similarity-weighted mean label of its ``k`` nearest training
neighbours, the top similarity and the mean similarity. Computed without leakage:

* The neighbour pool is only the rows a head was fitted on. :class:`KNNFeatureHead`
  wraps a base head; its ``fit`` builds the index on its training rows and its
  ``predict_proba`` queries that pool. Because :func:`~hybridstack.heads.base.fit_oof`
  clones the head per fold, a validation row only ever sees training-fold rows.
* A training row's own features come from the *other* training rows: every
  neighbour in the row's exclusion group (the row itself, its exact duplicates and,
  for pairwise, every row with the same prompt) is dropped by group id, never by
  position. The same rule applies to validation and test queries, so a model never
  meets a kind of neighbour at prediction time that it did not see in training.
* When the pool holds fewer than ``k`` eligible rows the missing neighbours are
  simply absent (weight 0); a row with none at all gets the pool's label prior.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from sklearn.base import BaseEstimator, clone

from hybridstack.errors import HybridstackError
from hybridstack.runs import write_with

IndexKind = Literal["flat", "ivf"]
_WEIGHT_FLOOR = 1e-6  # keeps weights positive when every similarity is <= 0
# Extra candidates fetched per query, re-scored exactly: faiss computes similarities with
# BLAS for batches of 20+ queries and without it below, so the k-th neighbour of a row
# could depend on which rows were searched with it (seen on LMSYS-like data: 2 rows in 254
# changed by 8e-4 after the stack). Re-ranking by a per-row dot product removes that.
_RERANK_MARGIN = 8
_RERANK_ROWS = 256  # queries re-scored at a time (bounds the gathered pool vectors)
_CHUNK_ROWS = 8192  # rows normalised / copied into an index at a time (bounds temporaries)
# IndexIVF.add assigns rows to lists in blocks of this many; the BLAS similarities (so a row
# on a list boundary) can depend on the block, so assigning ourselves uses the same blocks.
_FAISS_ADD_BLOCK = 65536


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy of (n, d) ``vectors`` (zero rows stay zero)."""
    out = np.array(vectors, dtype=np.float32, order="C")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


class NormalizedKeys:
    """The normalised key columns ``X[:, start:stop]``, made a slice of rows at a time.

    Slicing gives exactly the rows :func:`normalize_rows` gives for the whole matrix (each row
    is normalised on its own), without a second full-size copy of the keys: the index build
    and the searches read it chunk by chunk.
    """

    def __init__(self, X: np.ndarray, start: int, stop: int):
        self.X, self.start, self.stop = X, start, stop
        self.shape = (X.shape[0], stop - start)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return normalize_rows(self.X[rows, self.start:self.stop])


class PoolRows:
    """Rows ``rows`` of a :class:`KnnPool`'s (normalised) vectors, gathered a slice at a time."""

    def __init__(self, pool: KnnPool, rows: np.ndarray):
        self.pool, self.rows = pool, rows
        self.shape = (len(rows), pool.vectors.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.pool.vectors[self.rows[rows]], dtype=np.float32)


def materialize(vectors: Any) -> np.ndarray:
    """One contiguous float32 (n, d) array of ``vectors`` (an array, or rows sliced lazily),
    filled chunk by chunk so no full-size temporary is made on the way."""
    if isinstance(vectors, np.ndarray):
        return np.ascontiguousarray(vectors, dtype=np.float32)
    out = np.empty(vectors.shape, dtype=np.float32)
    for lo in range(0, len(out), _CHUNK_ROWS):
        out[lo:lo + _CHUNK_ROWS] = vectors[lo:lo + _CHUNK_ROWS]
    return out


def ivf_list_count(n: int) -> int:
    """Inverted lists for ``n`` vectors: ~4 sqrt(n), and >= 39 training points per list
    (faiss' k-means minimum)."""
    return max(1, min(4 * int(np.sqrt(n)), n // 39))


class IndexRecipe:
    """A trained, empty inner-product index and each row's IVF list: all :meth:`fill` needs to
    make the index of those rows again without re-training (k-means is most of an IVF build).
    """

    def __init__(self, empty: faiss.Index, lists: np.ndarray | None):
        self.empty, self.lists = empty, lists

    @classmethod
    def train(cls, vectors: Any, kind: IndexKind = "flat", nprobe: int = 16) -> IndexRecipe:
        n, dim = vectors.shape
        if kind == "flat":
            return cls(faiss.IndexFlatIP(dim), None)
        index = faiss.index_factory(dim, f"IVF{ivf_list_count(n)},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = nprobe
        sample = materialize(vectors)  # k-means trains on every row (n < 256 per list)
        index.train(sample)
        lists = np.concatenate([ivf.quantizer.assign(sample[lo:lo + _FAISS_ADD_BLOCK], 1)[:, 0]
                                for lo in range(0, n, _FAISS_ADD_BLOCK)] or [np.zeros(0, np.int64)])
        return cls(index, lists)  # the training sample is freed here

    def fill(self, vectors: Any) -> faiss.Index:
        """A new index holding ``vectors`` (the rows trained on, in order), as ``add`` would
        make it, but with each storage array allocated once at its final size: faiss grows
        them one row at a time, and that growth (doubling) left an IVF index ~1.4x its data."""
        index = faiss.clone_index(self.empty)
        if len(vectors):
            if self.lists is None:
                _fill_flat(index, vectors)
            else:
                _fill_lists(faiss.extract_index_ivf(index), vectors, self.lists)
        return index


def _fill_flat(index: faiss.IndexFlat, vectors: Any) -> None:
    n, dim = vectors.shape
    index.codes.resize(n * index.code_size)
    storage = faiss.rev_swig_ptr(index.codes.data(), n * index.code_size).view(np.float32)
    storage = storage.reshape(n, dim)  # a view of the index's own memory
    for lo in range(0, n, _CHUNK_ROWS):
        storage[lo:lo + _CHUNK_ROWS] = vectors[lo:lo + _CHUNK_ROWS]
    index.ntotal = n


def _fill_lists(ivf: faiss.IndexIVF, vectors: Any, lists: np.ndarray) -> None:
    """Each list sized once to its row count, then filled in row order (as ``add`` fills it;
    rows without a list, which ``add`` skips, are skipped)."""
    invlists = ivf.invlists
    counts = np.bincount(lists[lists >= 0], minlength=ivf.nlist)
    for list_no in np.flatnonzero(counts):
        invlists.resize(int(list_no), int(counts[list_no]))
    filled = np.zeros(ivf.nlist, dtype=np.int64)
    for lo in range(0, len(lists), _CHUNK_ROWS):
        block_lists = lists[lo:lo + _CHUNK_ROWS]
        order = np.argsort(block_lists, kind="stable")  # stable: row order within a list
        order = order[block_lists[order] >= 0]
        sorted_lists = block_lists[order]
        codes = np.ascontiguousarray(vectors[lo:lo + _CHUNK_ROWS][order], dtype=np.float32)
        ids = (lo + order).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, sorted_lists[1:] != sorted_lists[:-1]]) if len(order) else []
        for a, b in zip(starts, [*starts[1:], len(order)], strict=True):
            list_no = int(sorted_lists[a])
            invlists.update_entries(list_no, int(filled[list_no]), int(b - a),
                                    faiss.swig_ptr(ids[a:b]), faiss.swig_ptr(codes[a:b].view(np.uint8)))
            filled[list_no] += b - a
    ivf.ntotal = len(lists)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    An IVF index keeps its vectors in one heap block per list (~170 kB each at 200k rows);
    glibc keeps such blocks after they are freed, below later allocations, so a dropped index
    would still hold its memory while the base head's input (as large) is made.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None  # looked up on first use; False where the C library has none


def build_index(vectors: Any, kind: IndexKind = "flat", nprobe: int = 16) -> faiss.Index:
    """An inner-product index over normalised (n, d) float32 ``vectors`` (an array, or
    :class:`NormalizedKeys` / :class:`PoolRows`, read a chunk at a time).

    ``"flat"`` is exact; ``"ivf"`` clusters the pool into :func:`ivf_list_count` lists
    and scans ``nprobe`` of them per query (approximate, much faster on 10^5+ rows).
    """
    return IndexRecipe.train(vectors, kind, nprobe).fill(vectors)


def search_excluding_groups(
    index: faiss.Index,
    pool_groups: np.ndarray,
    queries: np.ndarray,
    query_groups: np.ndarray,
    k: int,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest pool rows of each query whose group differs from the query's.

    Parameters
    ----------
    index : faiss index over the pool (ntotal rows).
    pool_groups : (ntotal,) int64 exclusion group of each pool row.
    queries : (m, d) normalised float32, or :class:`NormalizedKeys`. query_groups : (m,) int64.
    k : neighbours wanted; fewer are returned when fewer are eligible.
    batch_size : queries per faiss call, so memory stays bounded.

    Returns
    -------
    sims : (m, k) float32, NaN where no neighbour was found.
    ids : (m, k) int64 pool row ids, -1 where no neighbour was found.
    """
    sims = np.full((len(queries), k), np.nan, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start, stop, batch_sims, batch_ids in search_batches(index, pool_groups, queries,
                                                             query_groups, k, batch_size):
        sims[start:stop], ids[start:stop] = batch_sims, batch_ids
    return sims, ids


def search_batches(index: faiss.Index, pool_groups: np.ndarray, queries: Any,
                   query_groups: np.ndarray, k: int, batch_size: int = 4096) -> Iterator[tuple]:
    """:func:`search_excluding_groups` one batch of queries at a time: yields
    ``(start, stop, sims, ids)`` of rows ``start:stop`` (a caller that reduces each batch
    never holds the (m, k) results of every query)."""
    group_values, group_sizes = np.unique(pool_groups, return_counts=True)
    for start in range(0, len(queries), batch_size):
        stop = min(start + batch_size, len(queries))
        batch_groups = query_groups[start:stop]
        sims = np.full((stop - start, k), np.nan, dtype=np.float32)
        ids = np.full((stop - start, k), -1, dtype=np.int64)
        # search deep enough that k neighbours survive dropping the largest own group
        excluded = _pool_count(group_values, group_sizes, batch_groups).max(initial=0)
        depth = int(min(index.ntotal, k + excluded))
        if depth == 0:
            yield start, stop, sims, ids
            continue
        batch = queries[start:stop]  # normalised here when the queries are NormalizedKeys
        found_ids = index.search(batch, min(index.ntotal, depth + _RERANK_MARGIN))[1]
        found_sims, found_ids = exact_rerank(index, batch, found_ids)
        eligible = found_ids >= 0
        eligible &= pool_groups[np.maximum(found_ids, 0)] != batch_groups[:, None]
        # stable sort keeps the similarity order among the eligible neighbours
        order = np.argsort(~eligible, axis=1, kind="stable")[:, :k]
        keep = np.take_along_axis(eligible, order, axis=1)
        width = order.shape[1]
        sims[:, :width] = np.where(keep, np.take_along_axis(found_sims, order, axis=1), np.nan)
        ids[:, :width] = np.where(keep, np.take_along_axis(found_ids, order, axis=1), -1)
        yield start, stop, sims, ids


def exact_rerank(index: faiss.Index, queries: np.ndarray,
                 ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarities of each query to its candidate pool rows, computed row by row (so they
    do not depend on the batch), and the candidates sorted by them (ties: lower id first).

    Returns (sims, ids) of ``ids``' shape; missing candidates (-1) sort last with NaN.
    """
    _ensure_reconstructable(index)
    sims = np.full(ids.shape, -np.inf, dtype=np.float32)
    for lo in range(0, len(ids), _RERANK_ROWS):
        block = ids[lo:lo + _RERANK_ROWS]
        found = block >= 0
        vectors = np.zeros((*block.shape, queries.shape[1]), dtype=np.float32)
        vectors[found] = index.reconstruct_batch(block[found].astype(np.int64))
        dots = np.einsum("md,mkd->mk", queries[lo:lo + _RERANK_ROWS], vectors)
        sims[lo:lo + _RERANK_ROWS] = np.where(found, dots, -np.inf)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -sims), axis=1)
    sims = np.take_along_axis(sims, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    return np.where(np.isfinite(sims), sims, np.nan).astype(np.float32), ids


def _ensure_reconstructable(index: faiss.Index) -> None:
    """IVF indexes return stored vectors only with a direct map (made once, in place)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return  # a flat index stores its vectors in order
    if ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()


def _pool_count(group_values: np.ndarray, group_sizes: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """How many pool rows share each of ``groups`` (0 for groups absent from the pool)."""
    if len(group_values) == 0:
        return np.zeros(len(groups), dtype=np.int64)
    pos = np.minimum(np.searchsorted(group_values, groups), len(group_values) - 1)
    return np.where(group_values[pos] == groups, group_sizes[pos], 0)


def neighbour_features(sims: np.ndarray, ids: np.ndarray, pool_Y: np.ndarray,
                       prior: np.ndarray) -> np.ndarray:
    """Label and similarity features from a neighbour search.

    Parameters
    ----------
    sims, ids : (m, k) from :func:`search_excluding_groups`.
    pool_Y : (ntotal, C) float32 labels of the pool. prior : (C,) used when no neighbour exists.

    Returns
    -------
    (m, C + 2) float32: similarity-weighted mean label per column, top-1 similarity,
    mean similarity of the neighbours found (0 when none).
    """
    found = ids >= 0
    weights = np.where(found, np.maximum(np.nan_to_num(sims), 0.0) + _WEIGHT_FLOOR, 0.0)
    labels = pool_Y[np.maximum(ids, 0)]  # (m, k, C); rows of missing neighbours get weight 0
    total = weights.sum(axis=1, keepdims=True)
    weighted = np.einsum("mk,mkc->mc", weights, labels) / np.where(total > 0, total, 1.0)
    label_mean = np.where(total > 0, weighted, prior[None, :])
    n_found = found.sum(axis=1)
    top = np.where(n_found > 0, np.nan_to_num(sims[:, 0]), 0.0)
    mean_sim = np.where(n_found > 0, np.nansum(sims, axis=1) / np.maximum(n_found, 1), 0.0)
    return np.column_stack([label_mean, top, mean_sim]).astype(np.float32)


class KnnPool:
    """The normalised kNN keys of an experiment's training rows, stored once for every head.

    Each distinct key vector is kept once, in the order first seen; a fitted
    :class:`KNNFeatureHead` holds the position of each of its pool rows here instead of its
    own copy of the vectors (on LMSYS a copy is ~0.5 GB per fold and head). The pool is
    content-addressed: ``knn/<digest>.npy`` inside the experiment folder, the digest the
    SHA-256 of the vectors, so heads, folds and re-runs on the same features share one file.
    """

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors  # (m, d) float32, unit rows; memory-mapped when loaded
        self.digest = hashlib.sha256(np.ascontiguousarray(vectors).data).hexdigest()[:16]
        self._positions: dict[bytes, int] | None = None

    @classmethod
    def from_keys(cls, keys: list[np.ndarray]) -> KnnPool:
        """The pool of every row of ``keys`` (raw key columns: train, and its swapped view)."""
        vectors = np.concatenate([materialize(NormalizedKeys(k, 0, k.shape[1])) for k in keys])
        seen: dict[bytes, int] = {}
        for i, row in enumerate(vectors):
            seen.setdefault(_row_digest(row), i)
        unique = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
        return cls(vectors[unique] if len(unique) < len(vectors) else vectors)

    def positions(self, vectors: Any) -> np.ndarray:
        """(n,) int64 position in the pool of each normalised row of ``vectors`` (an array or
        :class:`NormalizedKeys`, read a chunk at a time)."""
        if self._positions is None:
            self._positions = {}
            for i, row in enumerate(self.vectors):
                self._positions.setdefault(_row_digest(row), i)
        found = np.empty(len(vectors), dtype=np.int64)
        for lo in range(0, len(vectors), _CHUNK_ROWS):
            rows = np.asarray(vectors[lo:lo + _CHUNK_ROWS])
            try:
                found[lo:lo + len(rows)] = [self._positions[_row_digest(row)] for row in rows]
            except KeyError:
                raise ValueError("a kNN head was fitted on rows that are not in its pool") from None
            if not np.array_equal(self.vectors[found[lo:lo + len(rows)]], rows):
                raise ValueError("a kNN head was fitted on rows that are not in its pool")
        return found

    @staticmethod
    def path(run_dir: Path, digest: str) -> Path:
        return Path(run_dir) / POOL_DIR / f"{digest}.npy"

    def save(self, run_dir: Path) -> Path:
        """Write ``knn/<digest>.npy`` once (an existing file with this digest is the same)."""
        path = self.path(run_dir, self.digest)
        if not path.is_file():
            write_with(path, lambda fh: np.save(fh, self.vectors))
        return path

    @classmethod
    def load(cls, run_dir: Path, digest: str) -> KnnPool:
        pool = cls(np.load(cls.path(run_dir, digest), mmap_mode="r"))
        if pool.digest != digest:
            raise HybridstackError(f"{cls.path(run_dir, digest)} does not hold the kNN pool its "
                                   "name says (the file changed); re-run the embed stage")
        return pool

    # clone() deep-copies a head's parameters for every fold: all of them share this pool
    def __deepcopy__(self, memo: dict) -> KnnPool:
        return self


def _row_digest(row: np.ndarray) -> bytes:
    """A 16-byte name of a vector's exact bytes: the pool's lookup keys (the rows' own bytes
    as keys held a second copy of the pool, 4.6 kB a row on LMSYS)."""
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


POOL_DIR = "knn"  # runs/<experiment>/knn/<digest>.npy: the shared kNN pools


class KnnSearchCache:
    """kNN features already computed in this process, by content, for heads that search alike.

    The embed stage's heads (LightGBM, MLP, ...) are fitted on the same folds, keys, groups,
    labels and k, so each fold's neighbour search (of its training, stopping, held-out and test
    rows) gives the same features for every head: the first head computes them, the others
    read them here. An entry's key is the digest of the fitted rows (keys, groups, labels, the
    search settings) and of the queried rows, so a head that differs in any of them (fitted on
    other rows, another k) simply misses. Held in memory only: (rows x (C + 2)) float32 per
    split per fold, small next to the feature matrix; never pickled with a head.
    """

    def __init__(self) -> None:
        self._features: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: str, compute: Any) -> np.ndarray:
        if key in self._features:
            self.hits += 1
            return self._features[key]
        self.misses += 1
        features = compute()
        features.setflags(write=False)  # shared by several heads: never changed in place
        self._features[key] = features
        return features

    # clone() deep-copies a head's parameters for every fold: all of them share this cache
    def __deepcopy__(self, memo: dict) -> KnnSearchCache:
        return self


def rows_digest(X: np.ndarray, key_start: int, key_stop: int) -> str:
    """Digest of what a row contributes to a kNN search: its key columns and its group."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((X.shape[0], key_stop - key_start, X.dtype.str)).encode())
    for lo in range(0, X.shape[0], _CHUNK_ROWS):
        h.update(np.ascontiguousarray(X[lo:lo + _CHUNK_ROWS, key_start:key_stop]).data)
        h.update(np.ascontiguousarray(X[lo:lo + _CHUNK_ROWS, -1]).data)
    return h.hexdigest()


class KNNFeatureHead(BaseEstimator):
    """A head that appends leak-free kNN label features before its base head.

    Input layout: ``X = [features | group]`` where the last column holds each row's
    exclusion group id (an integer stored as float; rows of one group never see each
    other) and ``X[:, key_start:key_stop]`` is the kNN key (normalised here). The base
    head is fitted on ``[features | knn features]``; the group column is dropped.

    Parameters
    ----------
    base_head : unfitted head (cloned in ``fit``).
    key_start, key_stop : column range of the kNN key inside ``X``.
    k : neighbours per row. index_kind : "flat" (exact) or "ivf" (approximate).
    nprobe : IVF lists scanned per query. batch_size : queries per faiss call.
    pool : the experiment's :class:`KnnPool` holding every fitted row's key; the fitted head
        then keeps positions into it, and is pickled without vectors (re-attach the pool
        with :meth:`attach_pool` after loading). None: the head keeps its own index.
    search_cache : a :class:`KnnSearchCache` shared with other heads fitted on the same rows:
        features one of them has computed are read, not searched again. Never pickled.

    Memory: the keys are normalised a chunk at a time (never a full second copy), and the
    index is dropped while the base head's widened input exists (both are as large as the
    keys); a head with a pool rebuilds it from the pool when a search needs it, one without
    rebuilds it before ``fit`` returns (from the trained quantizer: no second k-means).
    """

    def __init__(self, base_head: Any, key_start: int = 0, key_stop: int | None = None,
                 k: int = 20, index_kind: IndexKind = "flat", nprobe: int = 16,
                 batch_size: int = 4096, pool: KnnPool | None = None,
                 search_cache: KnnSearchCache | None = None):
        self.base_head = base_head
        self.key_start = key_start
        self.key_stop = key_stop
        self.k = k
        self.index_kind = index_kind
        self.nprobe = nprobe
        self.batch_size = batch_size
        self.pool = pool
        self.search_cache = search_cache

    def _key_columns(self, X: np.ndarray) -> tuple[int, int]:
        return self.key_start, X.shape[1] - 1 if self.key_stop is None else self.key_stop

    def _lazy_keys_and_groups(self, X: np.ndarray) -> tuple[NormalizedKeys, np.ndarray]:
        return NormalizedKeys(X, *self._key_columns(X)), X[:, -1].astype(np.int64)

    def _key_and_groups(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys, groups = self._lazy_keys_and_groups(X)
        return materialize(keys), groups

    def _with_knn(self, X: np.ndarray, knn: np.ndarray) -> np.ndarray:
        return np.hstack([X[:, :-1], knn]).astype(np.float32, copy=False)

    def _index(self) -> faiss.Index:
        """The fitted pool's index, made when a search first needs it: from the keys being
        fitted, else from the pool (trained once: a kept recipe refills it without k-means)."""
        if getattr(self, "index_", None) is None:
            source = getattr(self, "_fit_keys", None)
            if source is None and getattr(self, "pool", None) is not None:
                source = PoolRows(self.pool, self.pool_rows_)
            if source is None:
                raise HybridstackError("a kNN head loaded from disk needs its pool: attach_pool(pool)")
            recipe = getattr(self, "_recipe", None)
            if recipe is None:
                recipe = self._recipe = IndexRecipe.train(source, self.index_kind, self.nprobe)
            self.index_ = recipe.fill(source)
        return self.index_

    def _search(self, key: Any, groups: np.ndarray) -> np.ndarray:
        # features batch by batch: the (m, k) neighbours of every row are never all held
        features = np.empty((len(key), self.pool_Y_.shape[1] + 2), dtype=np.float32)
        for start, stop, sims, ids in search_batches(self._index(), self.pool_groups_, key,
                                                     groups, self.k, self.batch_size):
            features[start:stop] = neighbour_features(sims, ids, self.pool_Y_, self.prior_)
        return features

    def _features_of(self, X: np.ndarray, query_digest: str | None = None) -> np.ndarray:
        """kNN features of rows ``X``, read from the shared search cache when one holds them."""
        def search() -> np.ndarray:
            return self._search(*self._lazy_keys_and_groups(X))

        cache, fitted = getattr(self, "search_cache", None), getattr(self, "fit_digest_", None)
        if cache is None or fitted is None:
            return search()
        query = query_digest or rows_digest(X, *self._key_columns(X))
        return cache.get_or_compute(f"{fitted}:{query}", search)

    def knn_features(self, X: np.ndarray) -> np.ndarray:
        """(n, C + 2) kNN features of rows ``X`` against the fitted pool."""
        return self._features_of(X)

    def _fit_digest(self, rows: str, Y: np.ndarray) -> str:
        """What the features of any query depend on besides the query: the fitted rows and
        labels, and the search settings."""
        h = hashlib.blake2b(digest_size=16)
        h.update(rows.encode())
        h.update(repr((Y.shape, self.k, self.index_kind, self.nprobe, self.batch_size)).encode())
        h.update(np.ascontiguousarray(Y).data)
        return h.hexdigest()

    def fit(self, X: np.ndarray, Y: np.ndarray, X_val: np.ndarray | None = None,
            Y_val: np.ndarray | None = None) -> KNNFeatureHead:
        """Index the training rows, give each one features from the other groups, fit the base head.

        X : (n, d + 1) features with the group column last. Y : (n, C) float32 target.
        X_val, Y_val : optional validation rows (same layout), passed on for early stopping.
        """
        keys, groups = self._lazy_keys_and_groups(X)
        self.pool_Y_ = np.asarray(Y, dtype=np.float32)
        self.pool_groups_ = groups
        self.prior_ = self.pool_Y_.mean(axis=0)
        if self.pool is not None:
            self.pool_rows_ = self.pool.positions(keys).astype(np.int32)
        self.index_ = self._recipe = None
        fitted_rows = None
        if self.search_cache is not None:
            fitted_rows = rows_digest(X, *self._key_columns(X))
            self.fit_digest_ = self._fit_digest(fitted_rows, self.pool_Y_)
        self._fit_keys = keys  # the index, if a search needs one, is made from these
        try:
            # every row's own group is excluded: leave-group-out
            train_knn = self._features_of(X, fitted_rows)
            val_knn = None if X_val is None else self.knn_features(X_val)
            # the base head's input below is as large as the index: never hold both at once
            if self.index_ is not None:
                self.index_ = None
                release_freed_memory()
            val = None if X_val is None else self._with_knn(X_val, val_knn)
            self.base_head_ = clone(self.base_head).fit(self._with_knn(X, train_knn), Y, val, Y_val)
            if self.pool is None:
                self._index()  # a head without a pool owns (and pickles) its index
        finally:
            del self._fit_keys  # it holds X
        return self

    def attach_pool(self, pool: KnnPool) -> KNNFeatureHead:
        """Rebuild the index of a head loaded without vectors from the pool it was fitted on."""
        if pool.digest != self.pool_digest_:
            raise HybridstackError(f"this kNN head was fitted on pool {self.pool_digest_}, "
                                   f"not {pool.digest}; re-run the embed stage")
        self.pool = pool
        # the same vectors in the same order as at fit time: the same index and neighbours
        self.index_ = self._recipe = None
        self._index()
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, C) float32 probabilities of the base head on ``[features | knn features]``."""
        if getattr(self, "index_", None) is None and getattr(self, "pool", None) is None:
            raise HybridstackError("a kNN head loaded from disk needs its pool: attach_pool(pool)")
        return self.base_head_.predict_proba(self._with_knn(X, self.knn_features(X)))

    @property
    def best_iteration_(self) -> int | None:
        return getattr(self.base_head_, "best_iteration_", None)

    @property
    def early_stops(self) -> bool:
        return getattr(self.base_head, "early_stops", False)

    # faiss indexes are SWIG objects: pickle them (FoldStore uses joblib) as serialised bytes;
    # a head with a pool is pickled with positions into it instead (no vectors at all). The
    # search cache, the index recipe and the fit digest are this process's only.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # a copy: the live object keeps its index
        for transient in ("_recipe", "_fit_keys", "fit_digest_"):
            state.pop(transient, None)
        state["search_cache"] = None
        if state.get("pool") is not None:
            state["pool_digest_"] = state["pool"].digest
            state["pool"] = None
            state.pop("index_", None)
        elif state.get("index_") is not None:
            state["index_"] = faiss.serialize_index(state["index_"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("index_") is not None:
            state = {**state, "index_": faiss.deserialize_index(state["index_"])}
        state.setdefault("search_cache", None)  # heads pickled before the cache existed
        super().__setstate__(state)


# -- exclusion groups of rows scored after training ------------------------------------------

GROUP_MAP_FILE = "knn_groups.npz"
UNSEEN_GROUP = -1  # a group no pool row has: such a row may see every pool row


def key_hashes(keys: Any) -> np.ndarray:
    """(n,) uint64 hash of each group key (a prompt or a text), stable across processes."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(k).encode("utf-8", "surrogatepass"),
                                        digest_size=8).digest(), "little") for k in keys),
        dtype=np.uint64, count=len(keys))


class GroupMap:
    """The training rows' exclusion groups by key, saved with the model (no train.csv later).

    A new row whose key (pairwise: its prompt; else its text) equals a training row's gets
    that row's group, so, exactly as the test rows at training time, it never has that
    row as a neighbour; any other row gets :data:`UNSEEN_GROUP`.
    """

    def __init__(self, hashes: np.ndarray, groups: np.ndarray):
        # one entry per key (rows of one key share their group): sorted for searchsorted
        self.hashes, first = np.unique(np.asarray(hashes, dtype=np.uint64), return_index=True)
        self.groups = np.asarray(groups, dtype=np.int64)[first]

    @classmethod
    def from_keys(cls, keys: Any, groups: np.ndarray) -> GroupMap:
        return cls(key_hashes(keys), groups)

    def lookup(self, keys: Any) -> np.ndarray:
        """(n,) float32 group per key (the dtype of the feature matrix's group column)."""
        wanted = key_hashes(keys)
        if len(self.hashes) == 0:
            return np.full(len(wanted), UNSEEN_GROUP, dtype=np.float32)
        pos = np.minimum(np.searchsorted(self.hashes, wanted), len(self.hashes) - 1)
        found = self.hashes[pos] == wanted
        return np.where(found, self.groups[pos], UNSEEN_GROUP).astype(np.float32)

    def save(self, path: Path) -> None:
        write_with(path, lambda fh: np.savez(fh, hashes=self.hashes, groups=self.groups))

    @classmethod
    def load(cls, path: Path) -> GroupMap:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["hashes"], data["groups"])
