"""Word + character n-gram TF-IDF features.

The vectorizer is fitted once on train+test text (unsupervised, so no label leak) and
the matrices are cached by the caller, so LR heads with other settings reuse them.
For pairwise tasks every field (prompt, A, B) goes through the same vectorizer and
the row features are ``[prompt, A, B, A - B]``; the swapped view is
``[prompt, B, A, B - A]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion

from hybridstack.config import TfidfConfig
from hybridstack.experiment import Experiment
from hybridstack.runs import write_joblib

log = logging.getLogger(__name__)


def make_vectorizer(cfg: TfidfConfig) -> FeatureUnion:
    word = TfidfVectorizer(
        analyzer="word", ngram_range=tuple(cfg.word_ngrams), min_df=cfg.min_df,
        max_features=cfg.max_word_features, sublinear_tf=cfg.sublinear_tf,
        token_pattern=r"(?u)\b\w+\b", dtype=np.float32, strip_accents="unicode",
    )
    char = TfidfVectorizer(
        analyzer="char_wb", ngram_range=tuple(cfg.char_ngrams), min_df=cfg.min_df,
        max_features=cfg.max_char_features, sublinear_tf=cfg.sublinear_tf, dtype=np.float32,
    )
    return FeatureUnion([("word", word), ("char", char)])


@dataclass
class TfidfFeatures:
    X: sp.csr_matrix  # (n_train, d)
    X_test: sp.csr_matrix | None
    X_swap: sp.csr_matrix | None = None  # pairwise only
    X_test_swap: sp.csr_matrix | None = None
    vectorizer: FeatureUnion | None = None  # kept so predict can transform new text


def build_tfidf(
    cfg: TfidfConfig,
    train_fields: dict[str, list[str]],
    test_fields: dict[str, list[str]] | None,
    swap_fields: tuple[str, str] | None,
) -> TfidfFeatures:
    """Fit the vectorizer on every field of train+test and transform each split."""
    names = list(train_fields)
    corpus = [t for name in names for t in train_fields[name]]
    if test_fields is not None:
        corpus += [t for name in names for t in test_fields[name]]
    vectorizer = make_vectorizer(cfg).fit(corpus)
    X, X_swap = transform_rows(vectorizer, train_fields, swap_fields)
    X_test, X_test_swap = (
        transform_rows(vectorizer, test_fields, swap_fields) if test_fields is not None else (None, None)
    )
    return TfidfFeatures(X, X_test, X_swap, X_test_swap, vectorizer)


class TfidfFeaturizer:
    """The fitted vectorizer and the pair fields: new rows -> (X, X_swap). Saved as the model
    folder's ``featurizer.joblib``, so predict needs no tfidf code to featurise new text."""

    def __init__(self, vectorizer: FeatureUnion, swap_fields: tuple[str, str] | None):
        self.vectorizer = vectorizer
        self.swap_fields = swap_fields

    def transform(self, ds) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
        """``ds``: a parsed :class:`~hybridstack.tasks.Dataset`."""
        return transform_rows(self.vectorizer, ds.fields, self.swap_fields)


def transform_rows(vectorizer: FeatureUnion, fields: dict[str, list[str]],
                   swap_fields: tuple[str, str] | None) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
    """Features (and the swapped view, pairwise) of new rows with a fitted vectorizer."""
    names = list(fields)
    mats = {name: vectorizer.transform(fields[name]).tocsr() for name in names}
    if swap_fields is None:
        return mats[names[0]], None
    a, b = swap_fields
    return _pair(mats, names, a, b), _pair(mats, names, b, a)


def _pair(mats: dict[str, sp.csr_matrix], names: list[str], a: str, b: str) -> sp.csr_matrix:
    """[other fields..., first, second, first - second] for one ordering of the pair."""
    others = [mats[n] for n in names if n not in (a, b)]
    return sp.hstack([*others, mats[a], mats[b], mats[a] - mats[b]], format="csr", dtype=np.float32)


# -- the matrix cache (<workdir>/cache/features) ------------------------------------------

# Vectorizer settings: changing any of them invalidates the cached matrix; LR settings do not.
_MATRIX_KEYS = ("word_ngrams", "char_ngrams", "max_word_features", "max_char_features",
                "min_df", "sublinear_tf")


def matrix_cache_path(exp: Experiment) -> Path:
    params = {k: getattr(exp.cfg.tfidf, k) for k in _MATRIX_KEYS}
    key = hashlib.sha256((exp.fingerprint + json.dumps(params, default=str)).encode()).hexdigest()
    return exp.dir.features_dir / f"tfidf_{key[:16]}.joblib"


def load_or_build_matrix(exp: Experiment) -> TfidfFeatures:
    """The TF-IDF matrices of this experiment, fitted once and cached in features/."""
    path = matrix_cache_path(exp)
    if path.is_file():
        started = time.perf_counter()
        features = joblib.load(path)
        log.info("tfidf: reused cached matrix %s (%.1fs)", path.name, time.perf_counter() - started)
        return features
    started = time.perf_counter()
    features = build_tfidf(
        exp.cfg.tfidf, exp.train.fields,
        exp.test.fields if exp.test is not None else None,
        exp.task.swap_fields,
    )
    write_joblib(path, features)
    log.info("tfidf: fitted %d features in %.1fs -> %s",
             features.X.shape[1], time.perf_counter() - started, path.name)
    return features
