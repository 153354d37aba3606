"""hybridstack: staged hybrid text classification for Kaggle-style competitions."""

__version__ = "0.1.0"


def load(experiment_dir):
    """A :class:`hybridstack.predict.Predictor` for a finished experiment folder.

    Imported on first use, so ``import hybridstack`` stays light (no torch, no LightGBM).
    """
    from hybridstack.predict import load as load_predictor

    return load_predictor(experiment_dir)
