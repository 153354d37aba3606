"""Honest scoring of stackers: nested CV on the base models' outer folds, and the choice.

A stacker is fitted on the OOF rows of the other folds and predicts the held-out fold,
exactly as the base models were validated, so its score is comparable with theirs. Its
``fit`` receives only the training rows' labels; the held-out fold's labels are used
for nothing but the score.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone

from hybridstack.ensembles.inputs import StackInput

log = logging.getLogger(__name__)

SINGLE_PREFIX = "single:"  # candidate names of the pass-through base models


@dataclass
class NestedResult:
    """One candidate's nested-CV outcome.

    Attributes
    ----------
    oof : (n, C) float32 held-out predictions; NaN on rows left out of stacking.
    fold_scores : metric of each held-out fold.
    overall : metric over all stacked rows at once.
    seconds : wall time of the nested CV.
    """

    oof: np.ndarray
    fold_scores: dict[int, float]
    overall: float
    seconds: float


def nested_oof(
    stacker: Any,
    X: StackInput,
    Y: np.ndarray,
    fold_id: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], float],
) -> NestedResult:
    """Cross-validate ``stacker`` over the folds in ``fold_id``.

    Parameters
    ----------
    stacker : unfitted head-protocol estimator; cloned per fold.
    X : StackInput with n rows. Y : (n, C) float32 target.
    fold_id : (n,) int fold per row; -1 marks rows left out (never fitted, never predicted).
    score : the task metric ``score(Y, P)``.
    """
    started = time.perf_counter()
    oof = np.full(Y.shape, np.nan, dtype=np.float32)
    fold_scores: dict[int, float] = {}
    for k in np.unique(fold_id[fold_id >= 0]).tolist():
        train_rows = np.flatnonzero((fold_id >= 0) & (fold_id != k))
        valid_rows = np.flatnonzero(fold_id == k)
        model = clone(stacker).fit(X[train_rows], Y[train_rows])  # no held-out labels passed
        oof[valid_rows] = model.predict_proba(X[valid_rows])
        fold_scores[k] = score(Y[valid_rows], oof[valid_rows])
    used = fold_id >= 0
    overall = score(Y[used], oof[used])
    return NestedResult(oof, fold_scores, overall, time.perf_counter() - started)


@dataclass
class Choice:
    """The chosen candidate and a one-line reason a reader can act on."""

    name: str
    note: str


def choose(results: dict[str, NestedResult], greater_is_better: bool) -> Choice:
    """The best stacker by nested score, unless it does not beat the best single base model.

    ``results`` holds stackers and pass-through single models (names starting with
    ``single:``); a stacker must be strictly better than every single model to be chosen.
    """
    sign = 1.0 if greater_is_better else -1.0
    singles = {n: r for n, r in results.items() if n.startswith(SINGLE_PREFIX)}
    stackers = {n: r for n, r in results.items() if not n.startswith(SINGLE_PREFIX)}
    best_single = max(singles, key=lambda n: sign * singles[n].overall)
    single_score = singles[best_single].overall
    single_name = best_single.removeprefix(SINGLE_PREFIX)
    if not stackers:
        return Choice(best_single, f"only one base model: the stack passes {single_name} through")
    best = max(stackers, key=lambda n: sign * stackers[n].overall)
    if sign * stackers[best].overall > sign * single_score:
        return Choice(best, f"{best} nested score {stackers[best].overall:.5f} beats the best "
                            f"single model {single_name} ({single_score:.5f})")
    return Choice(best_single, f"no stacker beat the best single model {single_name} "
                               f"({single_score:.5f}; best stacker {best} "
                               f"{stackers[best].overall:.5f}): falling back to it")
