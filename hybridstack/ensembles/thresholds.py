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


def held_out_thresholds(Y: np.ndarray, P: np.ndarray, fold_id: np.ndarray,
                        label_names: list[str]) -> dict[str, dict[str, float]]:
    """Thresholds tuned on every row with ``fold_id >= 0``, reported honestly.

    The stored threshold of each label is tuned on all those rows; its precision, recall
    and F1 are those of thresholds tuned on the other folds, applied to each held-out fold
    (tuning and scoring on the same rows would report the best of many cut-offs).
    """
    used = fold_id >= 0
    out = tune_thresholds(Y[used], P[used], label_names)
    decided = np.zeros(Y.shape, dtype=np.int8)
    for k in np.unique(fold_id[used]).tolist():
        other, rows = used & (fold_id != k), fold_id == k
        decided[rows] = apply_thresholds(P[rows], tune_thresholds(Y[other], P[other], label_names),
                                         label_names)
    for j, name in enumerate(label_names):
        y, d = Y[used, j] > 0.5, decided[used, j] > 0
        hits = int((y & d).sum())
        precision = hits / d.sum() if d.any() else 0.0
        recall = hits / y.sum() if y.any() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        out[name].update(precision=float(precision), recall=float(recall), f1=float(f1),
                         scored_on="held-out folds, thresholds tuned on the other folds")
    return out
