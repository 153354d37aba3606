"""One binary model per label column: how every multilabel head and meta-model is fitted.

A label with too few rows of one class in the training rows (a rare label absent from a
fold) cannot be fitted; it predicts its constant rate, kept as a float where its model
would be. Fitted heads store the resulting list as it is, so pickled fold models of older
runs load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def has_both_classes(y: np.ndarray) -> bool:
    return len(np.unique(y)) > 1


def fit_per_label(Y: np.ndarray, fit_binary: Callable[[int], Any],
                  can_fit: Callable[[np.ndarray], bool] = has_both_classes) -> list[Any]:
    """``fit_binary(j)`` for each label column j of (n, C) ``Y`` that ``can_fit``; its rate else."""
    return [fit_binary(j) if can_fit(Y[:, j]) else float(Y[:, j].mean()) for j in range(Y.shape[1])]


def predict_per_label(models: Sequence[Any], predict_positive: Callable[[Any], np.ndarray],
                      n_rows: int) -> np.ndarray:
    """(n_rows, C) float32: each label's P(positive), a constant for a label kept as a rate."""
    columns = [np.full(n_rows, m) if isinstance(m, float) else predict_positive(m) for m in models]
    return np.column_stack(columns).astype(np.float32)


def fitted_models(models: Sequence[Any]) -> list[Any]:
    """The labels' fitted models, without the constant rates."""
    return [m for m in models if not isinstance(m, float)]
