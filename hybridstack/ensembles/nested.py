"""Honest scoring of stackers: nested CV on the base models' outer folds, and the choice.

A stacker is fitted on the OOF rows of the other folds and predicts the held-out fold,
exactly as the base models were validated, so its score is comparable with theirs. Its
``fit`` receives only the training rows' labels; the held-out fold's labels are used
for nothing but the score.

Picking the best of several candidates by those scores and reporting the winner's score
is optimistic again (the maximum of noisy estimates). :func:`selected_oof` moves the
choice inside the nest: each outer fold is predicted by the candidate chosen on inner
folds of the other rows, so the reported score includes the cost of choosing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    models: dict[int, Any] = field(default_factory=dict, repr=False)  # fitted per outer fold


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
    models: dict[int, Any] = {}
    for k in np.unique(fold_id[fold_id >= 0]).tolist():
        train_rows = np.flatnonzero((fold_id >= 0) & (fold_id != k))
        valid_rows = np.flatnonzero(fold_id == k)
        model = clone(stacker).fit(X[train_rows], Y[train_rows])  # no held-out labels passed
        oof[valid_rows] = model.predict_proba(X[valid_rows])
        fold_scores[k] = score(Y[valid_rows], oof[valid_rows])
        models[k] = model
    used = fold_id >= 0
    overall = score(Y[used], oof[used])
    return NestedResult(oof, fold_scores, overall, time.perf_counter() - started, models)


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


@dataclass
class SelectionResult:
    """The outer loop with the choice inside: the honest score of "choose, then fit".

    Attributes
    ----------
    oof : (n, C) float32; each outer fold predicted by the candidate chosen without it.
    fold_scores : metric of each outer fold. overall : metric over all stacked rows.
    chosen : the candidate chosen for each outer fold. seconds : wall time.
    """

    oof: np.ndarray
    fold_scores: dict[int, float]
    overall: float
    chosen: dict[int, str]
    seconds: float


def selected_oof(
    results: dict[str, NestedResult],
    X: StackInput,
    Y: np.ndarray,
    fold_id: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], float],
    greater_is_better: bool,
    inner_folds: Callable[[np.ndarray], np.ndarray],
) -> SelectionResult:
    """For each outer fold k: choose a candidate (:func:`choose`) by CV on inner folds of the
    other rows (``inner_folds(rows)``), and predict fold k with that candidate's model fitted
    on those rows (``results[name].models[k]``, from :func:`nested_oof`).

    Inside the inner CV a meta-model keeps the settings its outer fit chose on the same
    rows (``frozen()``: regularisation, rounds), so choosing costs one plain fit per
    candidate and inner fold; fold k's labels touch neither the settings nor the choice.
    """
    started = time.perf_counter()
    oof = np.full(Y.shape, np.nan, dtype=np.float32)
    fold_scores: dict[int, float] = {}
    chosen: dict[int, str] = {}
    for k in np.unique(fold_id[fold_id >= 0]).tolist():
        train_rows = np.flatnonzero((fold_id >= 0) & (fold_id != k))
        valid_rows = np.flatnonzero(fold_id == k)
        inner_id = np.full(len(Y), -1, dtype=np.int64)
        inner_id[train_rows] = inner_folds(train_rows)
        inner = {}
        for name, result in results.items():
            outer_fit = result.models[k]
            candidate = outer_fit.frozen() if hasattr(outer_fit, "frozen") else clone(outer_fit)
            inner[name] = nested_oof(candidate, X, Y, inner_id, score)
        chosen[k] = choose(inner, greater_is_better).name
        oof[valid_rows] = results[chosen[k]].oof[valid_rows]
        fold_scores[k] = score(Y[valid_rows], oof[valid_rows])
        log.info("stack: outer fold %d: %s chosen on inner folds, %.5f", k, chosen[k], fold_scores[k])
    used = fold_id >= 0
    return SelectionResult(oof, fold_scores, score(Y[used], oof[used]), chosen,
                           time.perf_counter() - started)
