"""Per-label decision thresholds for multilabel outputs, tuned on OOF predictions for F1.

The submission keeps probabilities (ROC-AUC needs them); thresholds serve label outputs.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve


def tune_thresholds(Y: np.ndarray, P: np.ndarray, label_names: list[str]) -> dict[str, dict[str, float]]:
    """The F1-maximising threshold of each label and its precision, recall and F1.

    Parameters
    ----------
    Y : (n, K) 0/1 target. P : (n, K) probabilities (OOF, never in-sample).
    label_names : the K label names.

    Returns
    -------
    ``{label: {"threshold", "precision", "recall", "f1", "support"}}``; a label with no
    positive rows gets threshold 0.5 and zero scores (F1 is undefined there).
    """
    out = {}
    for j, name in enumerate(label_names):
        y, p = Y[:, j] > 0.5, P[:, j]
        support = int(y.sum())
        if support == 0:
            out[name] = {"threshold": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
            continue
        precision, recall, thresholds = precision_recall_curve(y, p)
        # the last (precision=1, recall=0) point has no threshold
        precision, recall = precision[:-1], recall[:-1]
        f1 = np.divide(2 * precision * recall, precision + recall,
                       out=np.zeros_like(precision), where=(precision + recall) > 0)
        best = int(np.argmax(f1))
        out[name] = {"threshold": float(thresholds[best]), "precision": float(precision[best]),
                     "recall": float(recall[best]), "f1": float(f1[best]), "support": support}
    return out


def apply_thresholds(P: np.ndarray, thresholds: dict[str, dict[str, float]],
                     label_names: list[str]) -> np.ndarray:
    """(n, K) int8 labels: 1 where ``P`` reaches the label's tuned threshold."""
    cut = np.array([thresholds[name]["threshold"] for name in label_names])
    return (P >= cut).astype(np.int8)
