"""One fold assignment per experiment, shared by every stage.

pairwise: grouped by prompt (a prompt never spans two folds), stratified by winner.
multilabel: iterative multilabel stratification (Sechidis et al., 2011).
multiclass: stratified by class.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from hybridstack.errors import HybridstackError


def make_folds(
    stratify: np.ndarray,
    n_splits: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Return an int8 fold id per row.

    Parameters
    ----------
    stratify : (n,) class index, or (n, K) 0/1 label matrix for multilabel stratification.
    n_splits : number of folds.
    seed : shuffling seed; the same inputs and seed give the same folds.
    groups : (n,) optional group keys; rows of one group share a fold.
    """
    n = len(stratify)
    if n < n_splits:
        raise HybridstackError(f"{n} training rows cannot be split into {n_splits} folds; lower cv.n_splits")
    fold_id = np.full(n, -1, dtype=np.int8)
    dummy = np.zeros(n)
    if groups is not None:
        # factorize hashes the keys; np.unique on str would copy every prompt into a
        # fixed-width array as wide as the longest one (gigabytes on LMSYS)
        group_codes, _ = pd.factorize(np.asarray(groups, dtype=object))
        if group_codes.max() + 1 < n_splits:
            raise HybridstackError(
                f"only {group_codes.max() + 1} distinct groups for {n_splits} folds; lower cv.n_splits"
            )
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(dummy, stratify, group_codes)
    elif stratify.ndim == 2:
        splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(dummy, stratify)
    else:
        counts = np.bincount(stratify)
        if counts[counts > 0].min() < n_splits:
            # a class rarer than n_splits cannot be stratified: fall back to plain shuffling
            from sklearn.model_selection import KFold

            splits = KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(dummy)
        else:
            splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            splits = splitter.split(dummy, stratify)
    for k, (_, valid_rows) in enumerate(splits):
        fold_id[valid_rows] = k
    assert (fold_id >= 0).all(), "every row must be assigned a fold"
    return fold_id


def fold_rows(fold_id: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, valid_rows) of fold ``k``."""
    return np.flatnonzero(fold_id != k), np.flatnonzero(fold_id == k)
