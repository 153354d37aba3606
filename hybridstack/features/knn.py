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

The faiss indexes and the group-excluding search live in :mod:`hybridstack.features.knn_index`;
this module holds the features, the shared pool and the head.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sklearn.base import BaseEstimator, clone

from hybridstack.errors import HybridstackError
from hybridstack.features.knn_index import (
    CHUNK_ROWS,
    IndexKind,
    IndexRecipe,
    NormalizedKeys,
    materialize,
    release_freed_memory,
    search_batches,
)
from hybridstack.runs import write_with

_WEIGHT_FLOOR = 1e-6  # keeps weights positive when every similarity is <= 0


class PoolRows:
    """Rows ``rows`` of a :class:`KnnPool`'s (normalised) vectors, gathered a slice at a time."""

    def __init__(self, pool: KnnPool, rows: np.ndarray):
        self.pool, self.rows = pool, rows
        self.shape = (len(rows), pool.vectors.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.pool.vectors[self.rows[rows]], dtype=np.float32)


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
        for lo in range(0, len(vectors), CHUNK_ROWS):
            rows = np.asarray(vectors[lo:lo + CHUNK_ROWS])
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
    for lo in range(0, X.shape[0], CHUNK_ROWS):
        h.update(np.ascontiguousarray(X[lo:lo + CHUNK_ROWS, key_start:key_stop]).data)
        h.update(np.ascontiguousarray(X[lo:lo + CHUNK_ROWS, -1]).data)
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
