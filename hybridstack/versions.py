"""Library versions recorded next to every saved model and cache (reproducibility)."""

from __future__ import annotations

import platform
from importlib import metadata

VERSIONED = ("hybridstack", "numpy", "scikit-learn", "lightgbm", "torch", "transformers",
             "sentence-transformers", "accelerate", "faiss-cpu")


def library_versions() -> dict[str, str]:
    """Python and the installed versions of the libraries that shape results."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
