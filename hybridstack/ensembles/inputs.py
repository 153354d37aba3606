"""What a stacker sees: the base models' probabilities side by side, plus optional meta features.

Stackers follow the head protocol (``fit(X, Y)`` / ``predict_proba(X)``) with ``X`` a
:class:`StackInput`. It supports ``X[rows]`` and ``len(X)`` so the same row-subsetting
code serves nested CV, refits and predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from hybridstack.features.lengths import log_counts

# Probabilities are clipped before taking logs: a base model that outputs exactly 0 or 1
# would otherwise give an infinite logit (Kaggle's log loss clips at the same place).
PROB_CLIP = 1e-6


@dataclass(frozen=True)
class StackInput:
    """Base-model probabilities for a set of rows.

    Attributes
    ----------
    probs : (n, M, C) float32, model m's probability of column c for each row.
    meta : (n, F) float32 extra features (e.g. text lengths) or None.
    multilabel : True when the C columns are independent binary labels (sigmoid outputs),
        False when each row's C columns are one softmax distribution.
    groups : (n,) row groups the meta-models' inner CV keeps together (pairwise: the
        prompt, as the folds do), or None.
    """

    probs: np.ndarray
    meta: np.ndarray | None = None
    multilabel: bool = False
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.probs.ndim != 3:
            raise ValueError(f"probs must be (n, M, C), got shape {self.probs.shape}")
        if self.meta is not None and len(self.meta) != len(self.probs):
            raise ValueError(f"meta has {len(self.meta)} rows but probs has {len(self.probs)}")

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, rows: np.ndarray) -> StackInput:
        meta = None if self.meta is None else self.meta[rows]
        groups = None if self.groups is None else self.groups[rows]
        return StackInput(self.probs[rows], meta, self.multilabel, groups)

    def inner_splits(self, y: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train, validation) index pairs of the meta-models' inner CV on ``y``: stratified,
        and grouped when the rows have groups (a prompt's rows never straddle a split)."""
        if self.groups is None:
            splitter = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
            return list(splitter.split(np.zeros(len(y)), y))
        codes, _ = pd.factorize(np.asarray(self.groups, dtype=object))
        splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y, codes))

    @property
    def n_models(self) -> int:
        return self.probs.shape[1]

    @property
    def n_classes(self) -> int:
        return self.probs.shape[2]

    def logits(self) -> np.ndarray:
        """(n, M, C) float64: log-odds (multilabel) or log-probabilities (single-label)."""
        p = np.clip(self.probs.astype(np.float64), PROB_CLIP, 1 - PROB_CLIP)
        return np.log(p) - np.log1p(-p) if self.multilabel else np.log(p)

    def flat_logits(self) -> np.ndarray:
        """(n, M * C) logits, model-major: the feature matrix of the meta-models."""
        return self.logits().reshape(len(self), -1)

    def covered_rows(self) -> np.ndarray:
        """(n,) bool: rows that every base model predicted (no NaN)."""
        return ~np.isnan(self.probs).any(axis=(1, 2))



def meta_features(fields: dict[str, list[str]]) -> np.ndarray:
    """(n, 6 * n_fields) log length/structure counts of every text field, for the LightGBM stacker.

    The base models see length only indirectly (long answers win on LMSYS; very short
    comments are rarely toxic), so a tree meta-model can still gain from it.
    """
    return np.hstack([log_counts(texts) for texts in fields.values()])
