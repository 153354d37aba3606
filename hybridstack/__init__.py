"""hybridstack: staged hybrid text classification for Kaggle-style competitions."""

__version__ = "0.1.0"
