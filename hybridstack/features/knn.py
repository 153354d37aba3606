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

import hashlib
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


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy of (n, d) ``vectors`` (zero rows stay zero)."""
    out = np.array(vectors, dtype=np.float32, order="C")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def ivf_list_count(n: int) -> int:
    """Inverted lists for ``n`` vectors: ~4 sqrt(n), and >= 39 training points per list
    (faiss' k-means minimum)."""
    return max(1, min(4 * int(np.sqrt(n)), n // 39))


def build_index(vectors: np.ndarray, kind: IndexKind = "flat", nprobe: int = 16) -> faiss.Index:
    """An inner-product index over normalised (n, d) float32 ``vectors``.

    ``"flat"`` is exact; ``"ivf"`` clusters the pool into :func:`ivf_list_count` lists
    and scans ``nprobe`` of them per query (approximate, much faster on 10^5+ rows).
    """
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.index_factory(dim, f"IVF{ivf_list_count(n)},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        faiss.extract_index_ivf(index).nprobe = nprobe
    index.add(vectors)
    return index


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
    queries : (m, d) normalised float32. query_groups : (m,) int64.
    k : neighbours wanted; fewer are returned when fewer are eligible.
    batch_size : queries per faiss call, so memory stays bounded.

    Returns
    -------
    sims : (m, k) float32, NaN where no neighbour was found.
    ids : (m, k) int64 pool row ids, -1 where no neighbour was found.
    """
    group_values, group_sizes = np.unique(pool_groups, return_counts=True)
    sims = np.full((len(queries), k), np.nan, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        stop = min(start + batch_size, len(queries))
        batch_groups = query_groups[start:stop]
        # search deep enough that k neighbours survive dropping the largest own group
        excluded = _pool_count(group_values, group_sizes, batch_groups).max(initial=0)
        depth = int(min(index.ntotal, k + excluded))
        if depth == 0:
            continue
        found_ids = index.search(queries[start:stop], min(index.ntotal, depth + _RERANK_MARGIN))[1]
        found_sims, found_ids = exact_rerank(index, queries[start:stop], found_ids)
        eligible = found_ids >= 0
        eligible &= pool_groups[np.maximum(found_ids, 0)] != batch_groups[:, None]
        # stable sort keeps the similarity order among the eligible neighbours
        order = np.argsort(~eligible, axis=1, kind="stable")[:, :k]
        keep = np.take_along_axis(eligible, order, axis=1)
        width = order.shape[1]
        sims[start:stop, :width] = np.where(keep, np.take_along_axis(found_sims, order, axis=1), np.nan)
        ids[start:stop, :width] = np.where(keep, np.take_along_axis(found_ids, order, axis=1), -1)
    return sims, ids


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
        vectors = np.concatenate([normalize_rows(k) for k in keys])
        seen: dict[bytes, int] = {}
        for i, row in enumerate(vectors):
            seen.setdefault(row.tobytes(), i)
        unique = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
        return cls(vectors[unique] if len(unique) < len(vectors) else vectors)

    def positions(self, vectors: np.ndarray) -> np.ndarray:
        """(n,) int64 position in the pool of each normalised row of ``vectors``."""
        if self._positions is None:
            self._positions = {row.tobytes(): i for i, row in enumerate(self.vectors)}
        try:
            return np.fromiter((self._positions[row.tobytes()] for row in vectors),
                               dtype=np.int64, count=len(vectors))
        except KeyError:
            raise ValueError("a kNN head was fitted on rows that are not in its pool") from None

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


POOL_DIR = "knn"  # runs/<experiment>/knn/<digest>.npy: the shared kNN pools


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
    """

    def __init__(self, base_head: Any, key_start: int = 0, key_stop: int | None = None,
                 k: int = 20, index_kind: IndexKind = "flat", nprobe: int = 16,
                 batch_size: int = 4096, pool: KnnPool | None = None):
        self.base_head = base_head
        self.key_start = key_start
        self.key_stop = key_stop
        self.k = k
        self.index_kind = index_kind
        self.nprobe = nprobe
        self.batch_size = batch_size
        self.pool = pool

    def _key_and_groups(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key_stop = X.shape[1] - 1 if self.key_stop is None else self.key_stop
        return normalize_rows(X[:, self.key_start:key_stop]), X[:, -1].astype(np.int64)

    def _with_knn(self, X: np.ndarray, knn: np.ndarray) -> np.ndarray:
        return np.hstack([X[:, :-1], knn]).astype(np.float32, copy=False)

    def _search(self, key: np.ndarray, groups: np.ndarray) -> np.ndarray:
        sims, ids = search_excluding_groups(self.index_, self.pool_groups_, key, groups,
                                            self.k, self.batch_size)
        return neighbour_features(sims, ids, self.pool_Y_, self.prior_)

    def knn_features(self, X: np.ndarray) -> np.ndarray:
        """(n, C + 2) kNN features of rows ``X`` against the fitted pool."""
        return self._search(*self._key_and_groups(X))

    def fit(self, X: np.ndarray, Y: np.ndarray, X_val: np.ndarray | None = None,
            Y_val: np.ndarray | None = None) -> KNNFeatureHead:
        """Index the training rows, give each one features from the other groups, fit the base head.

        X : (n, d + 1) features with the group column last. Y : (n, C) float32 target.
        X_val, Y_val : optional validation rows (same layout), passed on for early stopping.
        """
        key, groups = self._key_and_groups(X)
        self.pool_Y_ = np.asarray(Y, dtype=np.float32)
        self.pool_groups_ = groups
        self.prior_ = self.pool_Y_.mean(axis=0)
        if self.pool is not None:
            self.pool_rows_ = self.pool.positions(key).astype(np.int32)
        self.index_ = build_index(key, self.index_kind, self.nprobe)
        train_knn = self._search(key, groups)  # every row's own group is excluded: leave-group-out
        del key  # the index holds the vectors now
        val = None if X_val is None else self._with_knn(X_val, self.knn_features(X_val))
        self.base_head_ = clone(self.base_head).fit(self._with_knn(X, train_knn), Y, val, Y_val)
        return self

    def attach_pool(self, pool: KnnPool) -> KNNFeatureHead:
        """Rebuild the index of a head loaded without vectors from the pool it was fitted on."""
        if pool.digest != self.pool_digest_:
            raise HybridstackError(f"this kNN head was fitted on pool {self.pool_digest_}, "
                                   f"not {pool.digest}; re-run the embed stage")
        self.pool = pool
        # the same vectors in the same order as at fit time: the same index and neighbours
        self.index_ = build_index(np.ascontiguousarray(pool.vectors[self.pool_rows_]),
                                  self.index_kind, self.nprobe)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, C) float32 probabilities of the base head on ``[features | knn features]``."""
        if not hasattr(self, "index_"):
            raise HybridstackError("a kNN head loaded from disk needs its pool: attach_pool(pool)")
        return self.base_head_.predict_proba(self._with_knn(X, self.knn_features(X)))

    @property
    def best_iteration_(self) -> int | None:
        return getattr(self.base_head_, "best_iteration_", None)

    @property
    def early_stops(self) -> bool:
        return getattr(self.base_head, "early_stops", False)

    # faiss indexes are SWIG objects: pickle them (FoldStore uses joblib) as serialised bytes;
    # a head with a pool is pickled with positions into it instead (no vectors at all)
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # a copy: the live object keeps its index
        if state.get("pool") is not None:
            state["pool_digest_"] = state["pool"].digest
            state["pool"] = None
            state.pop("index_", None)
        elif "index_" in state:
            state["index_"] = faiss.serialize_index(state["index_"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "index_" in state:
            state = {**state, "index_": faiss.deserialize_index(state["index_"])}
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
