"""The head protocol and the one shared cross-validation loop, :func:`fit_oof`.

A head is a scikit-learn style estimator: ``__init__`` stores keyword arguments,
``fit(X, Y, X_val=None, Y_val=None)`` returns self (the validation pair is for early
stopping), ``predict_proba(X)`` returns float32 ``(n, C)``. ``Y`` is always the
float32 ``(n, C)`` target: one-hot for single-label tasks, 0/1 columns for multilabel.
Heads never own a CV loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
from sklearn.base import clone

from hybridstack.features.pair_columns import PairColumns
from hybridstack.folds import fold_rows
from hybridstack.runs import write_joblib, write_with
from hybridstack.tasks import average_with_swapped, swapped_targets

log = logging.getLogger(__name__)


class Head(Protocol):
    def fit(self, X: Any, Y: np.ndarray, X_val: Any = None, Y_val: np.ndarray | None = None) -> Head: ...

    def predict_proba(self, X: Any) -> np.ndarray: ...


@dataclass
class SwapView:
    """An equivalent view of every row with two inputs swapped (pairwise A/B).

    ``permutation`` maps label columns of the swapped view back to the original
    (pairwise: [1, 0, 2] swaps winner_a and winner_b). Used for augmentation
    (train on both views) and test-time averaging (average both views' predictions).

    Either ``X`` / ``X_test`` are the swapped matrices themselves, or ``columns`` (a
    :class:`~hybridstack.features.pair_columns.PairColumns`) derives the swapped rows from
    :func:`fit_oof`'s own ``X`` / ``X_test`` when they are needed, so no swapped copy of the
    whole matrix is held; ``X`` / ``X_test`` then hold only the swapped view's columns past
    the layout (its ``tail``), or None.
    """

    X: Any  # (n_train, d) swapped train features, or with ``columns`` the tail's columns
    X_test: Any | None
    permutation: list[int]
    augment: bool = True
    tta: bool = True
    columns: PairColumns | None = None

    def train_rows(self, X_rows: Any, rows: np.ndarray) -> Any:
        """The swapped view of train rows ``rows``, whose features are ``X_rows``."""
        if self.columns is None:
            return _rows(self.X, rows)
        return self.columns.swap(X_rows, None if self.X is None else _rows(self.X, rows))

    def test_view(self, X_test: Any) -> Any:
        """The swapped view of the test matrix ``X_test``."""
        if self.columns is None:
            return self.X_test
        return self.columns.swap(X_test, self.X_test)


@dataclass
class OOFResult:
    oof: np.ndarray  # (n_train, C) float32; NaN rows were never validated
    test_pred: np.ndarray | None  # (n_test, C) float32, mean over fold models
    fold_scores: dict[int, float]
    fold_info: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def fold_average(preds: Iterable[np.ndarray]) -> np.ndarray:
    """(n, C) float32 mean of the fold models' predictions, summed in float64: the test
    prediction of every model, at training and at predict time alike."""
    total, n_folds = None, 0
    for pred in preds:
        total = pred.astype(np.float64) if total is None else total + pred
        n_folds += 1
    return (total / n_folds).astype(np.float32)


class OOFAccumulator:
    """Gathers each fold's held-out and test predictions into an :class:`OOFResult`.

    OOF rows of folds never added stay NaN; the test prediction is the fold average.
    """

    def __init__(self, Y: np.ndarray, folds: np.ndarray,
                 score: Callable[[np.ndarray, np.ndarray], float]):
        self.Y, self.folds, self.score = Y, folds, score
        self.oof = np.full(Y.shape, np.nan, dtype=np.float32)
        self.test_preds: list[np.ndarray] = []
        self.fold_scores: dict[int, float] = {}
        self.fold_info: dict[int, dict[str, Any]] = {}

    def add(self, k: int, valid_pred: np.ndarray, test_pred: np.ndarray | None,
            info: dict[str, Any]) -> float:
        """Record fold ``k``; returns its score on its held-out rows."""
        _, valid_rows = fold_rows(self.folds, k)
        self.oof[valid_rows] = valid_pred
        if test_pred is not None:
            self.test_preds.append(test_pred)
        self.fold_scores[k] = self.score(self.Y[valid_rows], valid_pred)
        self.fold_info[k] = info
        return self.fold_scores[k]

    def result(self, seconds: float) -> OOFResult:
        test_pred = fold_average(self.test_preds) if self.test_preds else None
        return OOFResult(self.oof, test_pred, self.fold_scores, self.fold_info, seconds)


class FoldStore:
    """Saves each finished fold (model + predictions) so an interrupted stage resumes.

    ``fold_<k>/model.joblib`` is the fitted head; ``fold_<k>/pred.npz`` its validation
    and test predictions. A fold counts as finished only when ``pred.npz`` exists and
    was written for the same config hash; it is written last, atomically.
    """

    def __init__(self, model_path: Path, config_hash: str):
        self.model_path = Path(model_path)
        self.config_hash = config_hash

    def _dir(self, k: int) -> Path:
        return self.model_path / f"fold_{k}"

    def load(self, k: int) -> tuple[np.ndarray, np.ndarray | None, dict] | None:
        pred_path = self._dir(k) / "pred.npz"
        if not pred_path.is_file():
            return None
        with np.load(pred_path, allow_pickle=False) as data:
            if str(data["config_hash"]) != self.config_hash:
                return None
            test = data["test"] if data["test"].size else None
            info = {"seconds": float(data["seconds"]), "best_iteration": int(data["best_iteration"])}
            return data["valid"], test, info

    def save(self, k: int, head: Any, valid: np.ndarray, test: np.ndarray | None, info: dict) -> None:
        write_joblib(self._dir(k) / "model.joblib", head)
        self.save_predictions(k, valid, test, info)

    def save_predictions(self, k: int, valid: np.ndarray, test: np.ndarray | None, info: dict) -> None:
        """``fold_<k>/pred.npz``: the fold's done marker, written last (after any model files)."""
        empty = np.zeros((0, valid.shape[1]), dtype=np.float32)
        arrays = {
            "valid": valid,
            "test": empty if test is None else test,
            "config_hash": np.array(self.config_hash),
            "seconds": np.array(info.get("seconds", 0.0)),
            "best_iteration": np.array(info.get("best_iteration") or -1),
        }
        write_with(self._dir(k) / "pred.npz", lambda fh: np.savez(fh, **arrays))


def _rows(X: Any, rows: np.ndarray) -> Any:
    return X[rows]


def _stack(a: Any, b: Any) -> Any:
    return sp.vstack([a, b], format="csr") if sp.issparse(a) else np.concatenate([a, b])


def predict_views(head: Head, X: Any, X_swapped: Any | None, permutation: list[int] | None) -> np.ndarray:
    """Predict, averaging with the swapped view (columns permuted back) when given."""
    return average_with_swapped(head.predict_proba, X, X_swapped, permutation)


def fit_oof(
    head: Head,
    X: Any,
    Y: np.ndarray,
    folds: np.ndarray,
    X_test: Any | None = None,
    *,
    score: Callable[[np.ndarray, np.ndarray], float],
    swap: SwapView | None = None,
    store: FoldStore | None = None,
    only_folds: list[int] | None = None,
    stopping_rows: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> OOFResult:
    """Cross-validate ``head`` on the given folds.

    Parameters
    ----------
    head : unfitted estimator; cloned per fold.
    X : (n_train, d) features (dense or sparse). Y : (n_train, C) float32 target.
    folds : (n_train,) int fold id. X_test : (n_test, d) or None.
    score : the task metric, ``score(Y, P)``.
    swap : optional swapped view for augmentation / test-time averaging.
    store : optional FoldStore; finished folds are loaded instead of refitted.
    only_folds : train only these folds; other OOF rows stay NaN.
    stopping_rows : ``k -> (fit_rows, stop_rows)``, a split of fold k's training rows; a
        head that early-stops (``head.early_stops``) then fits on ``fit_rows`` and stops on
        ``stop_rows``, so the held-out fold never picks its own model. Without it, such a
        head stops on the held-out fold (optimistic OOF).

    Returns
    -------
    OOFResult with OOF rows of each held-out fold filled, test predictions
    averaged over the fold models, and per-fold scores.
    """
    folds_done = OOFAccumulator(Y, folds, score)
    started = time.perf_counter()
    run_folds = sorted(set(folds.tolist())) if only_folds is None else sorted(only_folds)
    for k in run_folds:
        train_rows, valid_rows = fold_rows(folds, k)
        saved = store.load(k) if store is not None else None
        if saved is not None:
            valid_pred, test_pred, info = saved
            log.info("fold %d: loaded finished fold from %s", k, store.model_path.name)
        else:
            fold_start = time.perf_counter()
            fit_rows, stop_rows = train_rows, valid_rows
            if stopping_rows is not None and getattr(head, "early_stops", False):
                fit_rows, stop_rows = stopping_rows(k)
            X_fit, Y_fit = _rows(X, fit_rows), Y[fit_rows]
            if swap is not None and swap.augment:
                X_fit = _stack(X_fit, swap.train_rows(X_fit, fit_rows))
                Y_fit = np.concatenate([Y_fit, swapped_targets(Y_fit, swap.permutation)])
            model = clone(head)
            model.fit(X_fit, Y_fit, _rows(X, stop_rows), Y[stop_rows])
            del X_fit  # the fold's (augmented) copy of its rows is not needed to predict
            use_tta = swap is not None and swap.tta
            X_valid = _rows(X, valid_rows)
            valid_pred = predict_views(
                model, X_valid,
                swap.train_rows(X_valid, valid_rows) if use_tta else None,
                swap.permutation if use_tta else None,
            )
            test_pred = None
            if X_test is not None:
                # derived per fold, not kept across folds: held only while predicting
                test_pred = predict_views(
                    model, X_test, swap.test_view(X_test) if use_tta else None,
                    swap.permutation if use_tta else None,
                )
            info = {"seconds": round(time.perf_counter() - fold_start, 3),
                    "best_iteration": getattr(model, "best_iteration_", None)}
            if store is not None:
                store.save(k, model, valid_pred, test_pred, info)
        fold_score = folds_done.add(k, valid_pred, test_pred, info)
        log.info("fold %d: score %.5f (%.1fs)", k, fold_score, info.get("seconds", 0.0))
    return folds_done.result(time.perf_counter() - started)
