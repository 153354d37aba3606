"""Predict and explain with a finished experiment: ``hybridstack.load(run_dir)``.

``Predictor`` and ``load`` are imported on first access (PEP 562), so the ``predict``
sub-command registers without importing torch, transformers and LightGBM.
"""

from typing import Any

__all__ = ["Predictor", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hybridstack.predict import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'hybridstack.predict' has no attribute {name!r}")
