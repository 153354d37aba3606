"""The faiss side of the kNN features: normalised keys read a chunk at a time, inner-product
indexes (exact or IVF) built without full-size temporaries, and the neighbour search that drops
a query's own exclusion group and re-ranks exactly (see :mod:`hybridstack.features.knn`)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any, Literal

import faiss
import numpy as np

IndexKind = Literal["flat", "ivf"]
# Extra candidates fetched per query, re-scored exactly: faiss computes similarities with
# BLAS for batches of 20+ queries and without it below, so the k-th neighbour of a row
# could depend on which rows were searched with it (seen on LMSYS-like data: 2 rows in 254
# changed by 8e-4 after the stack). Re-ranking by a per-row dot product removes that.
_RERANK_MARGIN = 8
_RERANK_ROWS = 256  # queries re-scored at a time (bounds the gathered pool vectors)
CHUNK_ROWS = 8192  # rows normalised / copied into an index at a time (bounds temporaries)
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


def materialize(vectors: Any) -> np.ndarray:
    """One contiguous float32 (n, d) array of ``vectors`` (an array, or rows sliced lazily),
    filled chunk by chunk so no full-size temporary is made on the way."""
    if isinstance(vectors, np.ndarray):
        return np.ascontiguousarray(vectors, dtype=np.float32)
    out = np.empty(vectors.shape, dtype=np.float32)
    for lo in range(0, len(out), CHUNK_ROWS):
        out[lo:lo + CHUNK_ROWS] = vectors[lo:lo + CHUNK_ROWS]
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
    for lo in range(0, n, CHUNK_ROWS):
        storage[lo:lo + CHUNK_ROWS] = vectors[lo:lo + CHUNK_ROWS]
    index.ntotal = n


def _fill_lists(ivf: faiss.IndexIVF, vectors: Any, lists: np.ndarray) -> None:
    """Each list sized once to its row count, then filled in row order (as ``add`` fills it;
    rows without a list, which ``add`` skips, are skipped)."""
    invlists = ivf.invlists
    counts = np.bincount(lists[lists >= 0], minlength=ivf.nlist)
    for list_no in np.flatnonzero(counts):
        invlists.resize(int(list_no), int(counts[list_no]))
    filled = np.zeros(ivf.nlist, dtype=np.int64)
    for lo in range(0, len(lists), CHUNK_ROWS):
        block_lists = lists[lo:lo + CHUNK_ROWS]
        order = np.argsort(block_lists, kind="stable")  # stable: row order within a list
        order = order[block_lists[order] >= 0]
        sorted_lists = block_lists[order]
        codes = np.ascontiguousarray(vectors[lo:lo + CHUNK_ROWS][order], dtype=np.float32)
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
