"""LightGBM head: one multiclass model for single-label tasks, one binary model per label
for multilabel, early-stopped on the held-out fold through ``lgb.early_stopping``."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
from sklearn.base import BaseEstimator

from hybridstack.heads.per_label import fit_per_label, predict_per_label
from hybridstack.progress import progress


class LightGBMHead(BaseEstimator):
    """Gradient-boosted trees on dense features.

    Parameters
    ----------
    multilabel : one binary model per label column instead of one multiclass model.
    num_leaves, learning_rate, min_child_samples, subsample, colsample_bytree, reg_lambda :
        LightGBM parameters (``subsample`` is bagging_fraction, applied every iteration).
    n_estimators : most boosting rounds; early stopping picks the real count.
    early_stopping_rounds : rounds without improvement of the validation loss before stopping.
    num_threads : threads; fixed (not "all cores") so results do not depend on the machine.
    random_state : seed of bagging and feature sampling.
    """

    early_stops = True  # fit_oof passes it rows to stop on that are not the held-out fold

    def __init__(self, multilabel: bool = False, num_leaves: int = 31, learning_rate: float = 0.05,
                 n_estimators: int = 2000, min_child_samples: int = 20, subsample: float = 0.8,
                 colsample_bytree: float = 0.5, reg_lambda: float = 1.0,
                 early_stopping_rounds: int = 100, num_threads: int = 2, random_state: int = 42):
        self.multilabel = multilabel
        self.num_leaves = num_leaves
        self.learning_rate = learning_rate
        self.n_estimators = n_estimators
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.early_stopping_rounds = early_stopping_rounds
        self.num_threads = num_threads
        self.random_state = random_state

    def _params(self, objective: dict) -> dict:
        return {
            **objective,
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_child_samples": self.min_child_samples,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1 if self.subsample < 1 else 0,
            "feature_fraction": self.colsample_bytree,
            "lambda_l2": self.reg_lambda,
            "num_threads": self.num_threads,
            "seed": self.random_state,
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }

    def _train(self, objective: dict, X: np.ndarray, y: np.ndarray,
               X_val: np.ndarray | None, y_val: np.ndarray | None) -> lgb.Booster:
        # contiguous labels: a strided column of Y makes LightGBM copy (and warn)
        train_set = lgb.Dataset(X, label=np.ascontiguousarray(y), free_raw_data=True)
        with progress(total=self.n_estimators, desc="lightgbm", unit="rounds") as bar:
            callbacks = [lambda env: bar.update()]
            if X_val is None:
                return lgb.train(self._params(objective), train_set,
                                 num_boost_round=self.n_estimators, callbacks=callbacks)
            valid_set = lgb.Dataset(X_val, label=np.ascontiguousarray(y_val), reference=train_set)
            return lgb.train(
                self._params(objective), train_set, num_boost_round=self.n_estimators,
                valid_sets=[valid_set], valid_names=["valid"],
                callbacks=[*callbacks, lgb.early_stopping(self.early_stopping_rounds, verbose=False)],
            )

    def fit(self, X: np.ndarray, Y: np.ndarray, X_val: np.ndarray | None = None,
            Y_val: np.ndarray | None = None) -> LightGBMHead:
        """Fit on (n, d) ``X`` and (n, C) float32 ``Y``; early-stop on ``(X_val, Y_val)`` if given.

        Sets ``boosters_`` (one per label, or one multiclass booster; a label with one
        class in ``Y`` keeps its rate as a float) and ``best_iteration_`` (rounds used;
        the rounded mean over labels for multilabel).
        """
        self.n_classes_ = Y.shape[1]
        if self.multilabel:
            self.boosters_ = fit_per_label(Y, lambda j: self._train(
                {"objective": "binary"}, X, Y[:, j], X_val, None if Y_val is None else Y_val[:, j]))
        else:
            objective = {"objective": "multiclass", "num_class": self.n_classes_}
            y_val = None if Y_val is None else Y_val.argmax(axis=1)
            self.boosters_ = [self._train(objective, X, Y.argmax(axis=1), X_val, y_val)]
        rounds = [self._rounds(b) for b in self.boosters_ if isinstance(b, lgb.Booster)]
        self.best_iteration_ = int(round(np.mean(rounds))) if rounds else 0
        return self

    def _rounds(self, booster: lgb.Booster) -> int:
        # best_iteration is 0 when training ran without a validation set
        return booster.best_iteration or booster.current_iteration()

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, C) float32 probabilities (rows sum to 1 unless multilabel)."""
        if not self.multilabel:
            booster = self.boosters_[0]
            return booster.predict(X, num_iteration=self._rounds(booster)).astype(np.float32)
        return predict_per_label(self.boosters_, lambda b: b.predict(X, num_iteration=self._rounds(b)),
                                 len(X))
