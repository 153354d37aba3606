"""The A/B-swapped view of a pairwise feature matrix as a column permutation with a sign flip.

Pairwise rows are laid out in groups of ``[others, first, second, first - second]`` (e.g.
the TF-IDF n-grams of every field). Exchanging the pair moves the first block onto the
second's columns and the second onto the first's, and negates the difference block, so the
swapped view of any rows is an O(nnz) remap of their CSR ``indices`` and ``data``: no
swapped copy of a matrix has to be built, kept or cached. ``b - a`` is exactly ``-(a - b)``
in floating point, so the remap equals featurising the swapped pair entry for entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class PairColumns:
    """Column layout of a pairwise matrix: ``groups`` holds, in column order, each group's
    (width of the other fields' columns, width of one field's block)."""

    groups: tuple[tuple[int, int], ...]

    @property
    def n_columns(self) -> int:
        return sum(others + 3 * width for others, width in self.groups)

    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """(the swapped view's column of each column, whether its value changes sign)."""
        target = np.arange(self.n_columns, dtype=np.int64)
        negated = np.zeros(self.n_columns, dtype=bool)
        start = 0
        for others, width in self.groups:
            first = start + others
            target[first:first + width] += width  # first -> second's place
            target[first + width:first + 2 * width] -= width  # second -> first's place
            negated[first + 2 * width:first + 3 * width] = True  # first - second -> second - first
            start = first + 3 * width
        return target, negated

    def swap(self, X: sp.spmatrix, tail: sp.spmatrix | None = None) -> sp.csr_matrix:
        """The swapped view of the rows of ``X`` (sparse), as a new CSR matrix with sorted
        indices. ``X``'s first ``n_columns`` columns follow this layout; its columns after
        them, if any, are replaced by ``tail`` (the rows' own swapped values of columns that
        are no permutation, e.g. features scaled per column)."""
        X = X.tocsr()
        extra = X.shape[1] - self.n_columns
        if extra != (0 if tail is None else tail.shape[1]):
            raise ValueError(f"PairColumns: a {X.shape[1]}-column matrix for a layout of "
                             f"{self.n_columns} columns and a {extra}-column tail")
        indices, data, indptr = X.indices, X.data, X.indptr
        if extra:  # drop the tail's entries in one pass rather than slicing a column copy
            kept = indices < self.n_columns
            indices, data = indices[kept], data[kept]
            indptr = np.concatenate([[0], np.cumsum(kept)])[indptr].astype(X.indptr.dtype)
        target, negated = self.targets()
        data = data.copy() if data is X.data else data
        np.negative(data, out=data, where=negated[indices])
        swapped = sp.csr_matrix((data, target.astype(indices.dtype)[indices], indptr.copy()),
                                shape=(X.shape[0], self.n_columns))
        swapped.sort_indices()  # rows stay canonical, as a freshly stacked matrix's are
        if tail is None:
            return swapped
        return sp.hstack([swapped, tail], format="csr", dtype=X.dtype)

    def swap_dense(self, A: np.ndarray) -> np.ndarray:
        """The swapped view of a dense ``(n, n_columns)`` array."""
        target, negated = self.targets()
        swapped = np.empty_like(A)
        swapped[:, target] = np.where(negated, -A, A)
        return swapped
