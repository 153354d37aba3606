"""hybridstack: staged hybrid text classification for Kaggle-style competitions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from hybridstack.predict.predictor import Predictor

__version__ = "0.1.0"


def load(experiment_dir: str | Path, cache_dir: str | Path | None = None) -> Predictor:
    """A :class:`hybridstack.predict.Predictor` for a finished experiment folder.

    Imported on first use, so ``import hybridstack`` stays light (no torch, no LightGBM).
    ``cache_dir`` receives embeddings of texts the run did not cache (default: a temporary
    folder); the run folder and its workdir are never written.
    """
    from hybridstack.predict import load as load_predictor

    return load_predictor(experiment_dir, cache_dir)
