"""Token ids of many rows in two numpy arrays instead of Python lists of ints.

A Python list holds a token id as a pointer to an int object (~36 bytes a token); LMSYS at
full scale (57k rows x 2 views x up to max_length tokens) then costs gigabytes per rank.
:class:`TokenStore` keeps every row's ids in one flat int32 array and each row's
``[start, end)`` in int64 arrays: 4 bytes a token, sliceable, savable as ``.npy`` and
memory-mapped by every rank of a data-parallel run (one copy in the page cache).

A subset or reordering of rows (:meth:`TokenStore.take`) shares the flat array; only the
bounds are indexed, so the training rows of a fold, and their swapped views, cost no copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

IDS_FILE = "ids.npy"
OFFSETS_FILE = "offsets.npy"


class TokenStore(Sequence):
    """Token ids of n rows: ``store[i]`` is row i's int32 ids (a view into one flat array)."""

    def __init__(self, flat: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.flat = flat
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, rows: Iterable[np.ndarray]) -> TokenStore:
        """One store of the given rows' ids, in order (each row copied once, as int32)."""
        rows = [np.asarray(r, dtype=np.int32) for r in rows]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)
        return cls(flat.astype(np.int32, copy=False), offsets[:-1], offsets[1:])

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> TokenStore:
        """From a list of token-id lists (tests, benchmarks, older callers)."""
        return cls.from_arrays(rows)

    @classmethod
    def concat(cls, stores: Sequence[TokenStore]) -> TokenStore:
        """The rows of every store in turn; no copy of the ids when they share one flat array."""
        flat = stores[0].flat
        if all(s.flat is flat for s in stores):
            return cls(flat, np.concatenate([s.starts for s in stores]),
                       np.concatenate([s.ends for s in stores]))
        return cls.from_arrays(row for s in stores for row in s)

    # -- reading --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TokenStore(self.flat, self.starts[i], self.ends[i])
        return self.flat[self.starts[i]:self.ends[i]]

    def __iter__(self) -> Iterator[np.ndarray]:
        flat = self.flat
        for start, end in zip(self.starts.tolist(), self.ends.tolist()):
            yield flat[start:end]

    @property
    def lengths(self) -> np.ndarray:
        """(n,) int64 token count of each row."""
        return self.ends - self.starts

    def take(self, rows: np.ndarray | Sequence[int]) -> TokenStore:
        """Rows ``rows`` in that order, sharing this store's flat ids (only bounds are copied)."""
        rows = np.asarray(rows, dtype=np.int64)
        return TokenStore(self.flat, self.starts[rows], self.ends[rows])

    def to_lists(self) -> list[list[int]]:
        return [row.tolist() for row in self]

    # -- saving ---------------------------------------------------------------------------

    def compact(self) -> TokenStore:
        """The same rows with contiguous, in-order ids (a copy only when they are not already)."""
        n = len(self)
        if n == 0 or (self.starts[0] == 0 and self.ends[-1] == len(self.flat)
                      and np.array_equal(self.starts[1:], self.ends[:-1])):
            return self
        return TokenStore.from_arrays(self)

    def save(self, folder: Path) -> None:
        """``ids.npy`` (int32) and ``offsets.npy`` (int64, n + 1) in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        store = self.compact()
        offsets = np.concatenate([[0], store.ends]).astype(np.int64)
        np.save(folder / IDS_FILE, store.flat.astype(np.int32, copy=False))
        np.save(folder / OFFSETS_FILE, offsets)

    @classmethod
    def load(cls, folder: Path, mmap_mode: str | None = "r") -> TokenStore:
        """A store saved by :meth:`save`; memory-mapped read-only by default."""
        flat = np.load(folder / IDS_FILE, mmap_mode=mmap_mode)
        offsets = np.load(folder / OFFSETS_FILE)
        return cls(flat, offsets[:-1], offsets[1:])


def as_token_store(rows: TokenStore | Sequence[Sequence[int]]) -> TokenStore:
    """A store as is; a list of token-id lists converted."""
    return rows if isinstance(rows, TokenStore) else TokenStore.from_lists(rows)
