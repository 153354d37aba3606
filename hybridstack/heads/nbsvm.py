"""NB-SVM with a logistic loss (Wang & Manning, 2012): logistic regression on TF-IDF features
scaled by each label's naive-Bayes log-count ratio, a classic strong baseline on Jigsaw.

For one binary problem with positive rows P and negative rows N, the ratio of feature f is
``r_f = log((alpha + sum_P x_f) / |alpha + sum_P x|_1) - log((alpha + sum_N x_f) / |...|_1)``;
the model is a logistic regression on ``x * r``. Multilabel: one problem per label;
multiclass: one per class (one-vs-rest), the probabilities normalised to sum to 1. The
features must be non-negative (word and character TF-IDF are).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression

from hybridstack.heads.per_label import fit_per_label, predict_per_label


def log_count_ratio(X: sp.csr_matrix, y: np.ndarray, alpha: float) -> np.ndarray:
    """(d,) float32 naive-Bayes log-count ratio of the features for binary ``y``."""
    positive = np.asarray(X[y > 0.5].sum(axis=0)).ravel() + alpha
    negative = np.asarray(X[y <= 0.5].sum(axis=0)).ravel() + alpha
    return (np.log(positive / positive.sum()) - np.log(negative / negative.sum())).astype(np.float32)


class NBSVMHead(BaseEstimator):
    """Parameters: multilabel (one problem per label, else per class), C and max_iter of the
    logistic regressions, alpha (smoothing of the counts), random_state."""

    def __init__(self, multilabel: bool = False, C: float = 4.0, alpha: float = 1.0,
                 max_iter: int = 1000, random_state: int = 42):
        self.multilabel = multilabel
        self.C = C
        self.alpha = alpha
        self.max_iter = max_iter
        self.random_state = random_state

    def _fit_one(self, X: sp.csr_matrix, y: np.ndarray) -> tuple[np.ndarray, LogisticRegression]:
        ratio = log_count_ratio(X, y, self.alpha)
        # the dual problem: TF-IDF has far more columns than rows, and liblinear's dual solver
        # reaches the same optimum ~3x faster (jigsaw-toxic-10k: fold-0 mean AUC 0.92687 in
        # 68 s against 0.92686 in 200 s for the primal)
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, solver="liblinear",
                                   dual=True, random_state=self.random_state)
        return ratio, model.fit(_scaled(X, ratio), y)

    def fit(self, X, Y: np.ndarray, X_val=None, Y_val=None) -> NBSVMHead:
        X = sp.csr_matrix(X)
        if X.nnz and X.data.min() < 0:
            raise ValueError("NB-SVM needs non-negative features (counts or TF-IDF)")
        self.n_classes_ = Y.shape[1]
        self.models_ = fit_per_label(Y, lambda j: self._fit_one(X, Y[:, j]))
        return self

    def predict_proba(self, X) -> np.ndarray:
        X = sp.csr_matrix(X)
        P = predict_per_label(self.models_, lambda m: m[1].predict_proba(_scaled(X, m[0]))[:, 1],
                              X.shape[0])
        if self.multilabel:
            return P
        total = P.sum(axis=1, keepdims=True)
        return np.divide(P, total, out=np.full_like(P, 1 / P.shape[1]), where=total > 0)

    def decision_terms(self, X, label: int):
        """Per-feature contributions (coef * r * x) to ``label``'s logit, for explanations."""
        model = self.models_[label]
        if isinstance(model, float):
            return sp.csr_matrix(X.shape, dtype=np.float32)
        ratio, lr = model
        return sp.csr_matrix(X).multiply(lr.coef_[0] * ratio).tocsr()


def _scaled(X: sp.csr_matrix, ratio: np.ndarray) -> sp.csr_matrix:
    return X.multiply(ratio[None, :]).tocsr()
