"""Logistic regression head: multinomial for single-label, one model per label for multilabel."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression

from hybridstack.heads.per_label import fit_per_label, predict_per_label


class LogRegHead(BaseEstimator):
    """Logistic regression on (sparse) features.

    Parameters
    ----------
    multilabel : one binary model per label column instead of one multinomial model.
    C, class_weight, max_iter : passed to :class:`sklearn.linear_model.LogisticRegression`.
    """

    def __init__(self, multilabel: bool = False, C: float = 4.0, class_weight: str | None = None,
                 max_iter: int = 1000, random_state: int = 42):
        self.multilabel = multilabel
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def _model(self, solver: str) -> LogisticRegression:
        return LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter,
                                  solver=solver, random_state=self.random_state)

    def fit(self, X, Y: np.ndarray, X_val=None, Y_val=None) -> LogRegHead:
        self.n_classes_ = Y.shape[1]
        if self.multilabel:
            # liblinear is the fastest exact solver for one binary problem on sparse text
            self.models_ = fit_per_label(Y, lambda j: self._model("liblinear").fit(X, Y[:, j]))
        else:
            y = Y.argmax(axis=1)
            self.model_ = self._model("lbfgs").fit(X, y)
            self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X) -> np.ndarray:
        if self.multilabel:
            return predict_per_label(self.models_, lambda m: m.predict_proba(X)[:, 1], X.shape[0])
        proba = np.zeros((X.shape[0], self.n_classes_), dtype=np.float32)
        # classes missing from a training fold keep probability 0
        proba[:, self.classes_] = self.model_.predict_proba(X)
        return proba

    def decision_terms(self, X, label: int):
        """Per-feature contributions (coef * x) to ``label``'s logit, for explanations."""
        if self.multilabel:
            model = self.models_[label]
            coef = np.zeros(X.shape[1]) if isinstance(model, float) else model.coef_[0]
        else:
            row = int(np.flatnonzero(self.classes_ == label)[0])
            coef = self.model_.coef_[row]
        return X.multiply(coef).tocsr() if hasattr(X, "multiply") else X * coef
