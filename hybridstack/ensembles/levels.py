"""The fitted stack as a function of base-model predictions: level 1, then level 2 if it won.

Level 1 stacks the models that cover every training row; level 2 blends level 1 with the
models that cover only some folds (fitted on those rows). ``stack/meta_model.joblib``
holds both; the stack stage and ``predict`` go through :func:`predict_levels` alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hybridstack.ensembles.inputs import StackInput


def predict_levels(stack_model: dict[str, Any], preds: dict[str, np.ndarray],
                   meta: np.ndarray | None) -> np.ndarray:
    """(n, C) float32 stack output from each base model's (n, C) ``preds`` (keyed as the
    stack names them) and the meta features (when the stack uses them)."""
    multilabel = stack_model["multilabel"]
    # runs made before levels existed stacked every model at level 1
    level1 = stack_model.get("level1_models", stack_model["models"])
    probs = np.stack([preds[name] for name in level1], axis=1)
    P = stack_model["stacker"].predict_proba(StackInput(probs, meta, multilabel))
    level2 = stack_model.get("level2")
    if level2 is None:
        return P
    probs = np.stack([P] + [preds[name] for name in level2["models"]], axis=1)
    return level2["stacker"].predict_proba(StackInput(probs, None, multilabel))
