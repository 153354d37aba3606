"""Constrained weighted average of base models, optimised for the task metric.

Weights are the softmax of free parameters, so they are non-negative and sum to 1
without a constrained solver.

- single-label (log loss): a weighted average of probabilities, optionally followed by
  temperature scaling ``softmax(log(blend) / T)``; weights and T are fitted together by
  L-BFGS on the log loss.
- multilabel (mean ROC-AUC): per label, a weighted average of the models' log-odds whose
  weights maximise that label's ROC-AUC (computed from ranks, Mann-Whitney U; AUC is
  piecewise constant, so a derivative-free Nelder-Mead search is used). Averaging log-odds
  rather than raw ranks keeps the output a probability that does not depend on the batch
  it was predicted with, so thresholds and calibration carry over to test rows. An
  optional per-label temperature (fitted on the binary log loss; AUC is unaffected)
  calibrates it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_softmax, softmax
from scipy.stats import rankdata
from sklearn.base import BaseEstimator
from threadpoolctl import threadpool_limits

from hybridstack.ensembles.inputs import PROB_CLIP, StackInput

# log T is searched in [-3, 3]: T in [0.05, 20] covers any sane over/under-confidence.
_LOG_T_BOUNDS = (-3.0, 3.0)


def rank_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of ``score`` for 0/1 ``y`` via the rank-sum (Mann-Whitney U) formula; ties count 1/2."""
    positive = y > 0.5
    n_pos = int(positive.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class WeightedBlend(BaseEstimator):
    """Non-negative weights summing to 1 over the base models (see the module docstring).

    Parameters
    ----------
    temperature : also fit a temperature (one per label for multilabel).

    Attributes
    ----------
    weights_ : (M,) single-label or (C, M) multilabel, each row non-negative and summing to 1.
    temperature_ : float (single-label) or (C,) array (multilabel); 1.0 when not fitted.
    """

    def __init__(self, temperature: bool = True):
        self.temperature = temperature

    def fit(self, X: StackInput, Y: np.ndarray, X_val: Any = None, Y_val: Any = None) -> WeightedBlend:
        # hundreds of small matrix products: BLAS threads would only fight over the cores
        with threadpool_limits(limits=1):
            if X.multilabel:
                logits = X.logits()
                fitted = [self._fit_label(logits[:, :, j], Y[:, j]) for j in range(X.n_classes)]
                self.weights_ = np.array([w for w, _ in fitted])
                self.temperature_ = np.array([t for _, t in fitted])
            else:
                self.weights_, self.temperature_ = self._fit_softmax(X.probs.astype(np.float64), Y)
        return self

    # -- single-label ------------------------------------------------------------------
    def _fit_softmax(self, probs: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, float]:
        y = Y.argmax(axis=1)
        n_models = probs.shape[1]

        def loss(params: np.ndarray) -> float:
            log_p = _softmax_blend_log_proba(probs, params[:n_models], self._log_t(params, n_models))
            return -float(log_p[np.arange(len(y)), y].mean())

        start = np.zeros(n_models + int(self.temperature))
        bounds = [(None, None)] * n_models + [_LOG_T_BOUNDS] * int(self.temperature)
        params = minimize(loss, start, method="L-BFGS-B", bounds=bounds).x
        return softmax(params[:n_models]), float(np.exp(self._log_t(params, n_models)))

    def _log_t(self, params: np.ndarray, n_models: int) -> float:
        return float(params[n_models]) if self.temperature else 0.0

    # -- multilabel --------------------------------------------------------------------
    def _fit_label(self, logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        n_models = logits.shape[1]
        if n_models == 1 or len(np.unique(y)) < 2:
            return np.full(n_models, 1.0 / n_models), 1.0

        def negative_auc(theta: np.ndarray) -> float:
            return -rank_auc(y, logits @ softmax(theta))

        # Nelder-Mead's default simplex around 0 is tiny (2.5e-4) and AUC is flat at that
        # scale; unit steps move each weight visibly from the equal-weight start.
        start = np.zeros(n_models)
        simplex = np.vstack([start, np.eye(n_models)])
        theta = minimize(negative_auc, start, method="Nelder-Mead",
                         options={"initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-6}).x
        weights = softmax(theta)
        if not self.temperature:
            return weights, 1.0
        score = logits @ weights
        result = minimize_scalar(lambda log_t: _binary_log_loss(y, score / np.exp(log_t)),
                                 bounds=_LOG_T_BOUNDS, method="bounded")
        return weights, float(np.exp(result.x))

    # -- prediction --------------------------------------------------------------------
    def predict_proba(self, X: StackInput) -> np.ndarray:
        """(n, C) float32 blended probabilities."""
        if X.multilabel:
            score = np.einsum("nmc,cm->nc", X.logits(), self.weights_)
            return expit(score / self.temperature_).astype(np.float32)
        theta = np.log(np.maximum(self.weights_, 1e-300))
        log_p = _softmax_blend_log_proba(X.probs.astype(np.float64), theta, np.log(self.temperature_))
        return np.exp(log_p).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """JSON-able description: per-model weights (mean over labels) and temperatures."""
        weights = self.weights_.mean(axis=0) if self.weights_.ndim == 2 else self.weights_
        out: dict[str, Any] = {"kind": "blend weights", "weights": weights.tolist(),
                               "temperature": np.atleast_1d(self.temperature_).tolist()}
        if self.weights_.ndim == 2:
            out["per_label_weights"] = self.weights_.tolist()
        return out


def _softmax_blend_log_proba(probs: np.ndarray, theta: np.ndarray, log_t: float) -> np.ndarray:
    """(n, C) log-probabilities of ``softmax(log(sum_m w_m P_m) / T)`` with ``w = softmax(theta)``."""
    blend = np.einsum("nmc,m->nc", probs, softmax(theta))
    return log_softmax(np.log(np.clip(blend, PROB_CLIP, 1.0)) / np.exp(log_t), axis=1)


def _binary_log_loss(y: np.ndarray, logit: np.ndarray) -> float:
    # log(1 + e^-z) for positives, log(1 + e^z) for negatives, written stably
    sign = np.where(y > 0.5, -1.0, 1.0)
    return float(np.logaddexp(0.0, sign * logit).mean())
