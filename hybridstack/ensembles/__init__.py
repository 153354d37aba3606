"""Stackers and blenders over out-of-fold probability matrices."""

from __future__ import annotations

from typing import Any

from hybridstack.ensembles.meta import LGBMMeta, LogRegMeta
from hybridstack.ensembles.weighted import WeightedBlend


def make_stacker(method: str, *, temperature: bool = True, inner_folds: int = 3,
                 random_state: int = 42) -> Any:
    """An unfitted stacker for a ``stack.methods`` entry: weighted, logreg or lgbm."""
    if method == "weighted":
        return WeightedBlend(temperature=temperature)
    if method == "logreg":
        return LogRegMeta(inner_folds=inner_folds, random_state=random_state)
    if method == "lgbm":
        return LGBMMeta(inner_folds=inner_folds, random_state=random_state)
    raise ValueError(f"unknown stacking method {method!r}")
