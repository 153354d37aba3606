"""Word + character n-gram TF-IDF features.

The vectorizer is fitted once on train+test text (unsupervised, so no label leak) and
the matrices are cached by the caller, so LR heads with other settings reuse them.
For pairwise tasks every field (prompt, A, B) goes through the same vectorizer and
the row features are ``[prompt, A, B, A - B]``; the swapped view ``[prompt, B, A, B - A]``
is that matrix with its columns permuted and the difference negated
(:class:`~hybridstack.features.pair_columns.PairColumns`), so only ``X`` is built and cached;
of the swapped view only the few scaled shape-feature columns are kept (scaled per column,
they are no permutation of ``X``'s).
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
from hybridstack.features.lengths import log_counts
from hybridstack.features.pair_columns import PairColumns
from hybridstack.progress import Timer
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
    # caches written before ``columns`` hold the swapped matrices themselves (pairwise only)
    X_swap: sp.csr_matrix | None = None
    X_test_swap: sp.csr_matrix | None = None
    vectorizer: FeatureUnion | None = None  # kept so predict can transform new text
    shape_scale: np.ndarray | None = None  # tfidf.shape_features: each column's train max |x|
    # pairwise: the swapped view is X's n-gram columns permuted by ``columns`` + ``shape_swap``
    columns: PairColumns | None = None
    shape_swap: sp.csr_matrix | None = None  # tfidf.shape_features: swapped view's shape block
    shape_test_swap: sp.csr_matrix | None = None


def build_tfidf(
    cfg: TfidfConfig,
    train_fields: dict[str, list[str]],
    test_fields: dict[str, list[str]] | None,
    swap_fields: tuple[str, str] | None,
) -> TfidfFeatures:
    """Fit the vectorizer on every field of train+test and transform each split."""
    names = list(train_fields)
    splits = [train_fields] + ([test_fields] if test_fields is not None else [])
    corpus = [t for fields in splits for name in names for t in fields[name]]
    vectorizer = make_vectorizer(cfg)
    # fit_transform, then slice: each text goes through the (pure Python) analyzers once, not
    # once to fit and once more to transform
    with Timer(f"tfidf: vocabulary and matrix of {len(corpus)} texts", log):
        corpus_matrix = vectorizer.fit_transform(corpus).tocsr()
        corpus_matrix.sort_indices()  # fit_transform leaves them in vocabulary-fit order
    del corpus
    mats, start = [], 0
    for fields in splits:
        mats.append({})
        for name in names:
            stop = start + len(fields[name])
            mats[-1][name] = corpus_matrix[start:stop]
            start = stop
    del corpus_matrix
    scale = None
    if cfg.shape_features:  # max-abs scaled like the TF-IDF values, from the train rows only
        raw = shape_block(train_fields, swap_fields)
        scale = np.maximum(np.abs(raw).max(axis=0), 1e-6).astype(np.float32)
    X, columns, shape_swap = featurize_rows(vectorizer, train_fields, swap_fields, scale, mats[0])
    X_test, _, shape_test_swap = (
        featurize_rows(vectorizer, test_fields, swap_fields, scale, mats[1])
        if test_fields is not None else (None, None, None))
    return TfidfFeatures(X, X_test, vectorizer=vectorizer, shape_scale=scale, columns=columns,
                         shape_swap=shape_swap, shape_test_swap=shape_test_swap)


class TfidfFeaturizer:
    """The fitted vectorizer and the pair fields: new rows -> (X, X_swap). Saved as the model
    folder's ``featurizer.joblib``, so predict needs no tfidf code to featurise new text."""

    def __init__(self, vectorizer: FeatureUnion, swap_fields: tuple[str, str] | None,
                 shape_scale: np.ndarray | None = None):
        self.vectorizer = vectorizer
        self.swap_fields = swap_fields
        self.shape_scale = shape_scale

    def transform(self, ds) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
        """``ds``: a parsed :class:`~hybridstack.tasks.Dataset`."""
        # featurizers saved before shape features existed have no shape_scale
        return transform_rows(self.vectorizer, ds.fields, self.swap_fields,
                              getattr(self, "shape_scale", None))


def transform_rows(vectorizer: FeatureUnion, fields: dict[str, list[str]],
                   swap_fields: tuple[str, str] | None, shape_scale: np.ndarray | None = None
                   ) -> tuple[sp.csr_matrix, sp.csr_matrix | None]:
    """Features (and the swapped view, pairwise) of new rows with a fitted vectorizer; with
    ``shape_scale``, the scaled response-shape block (:func:`shape_block`) appended."""
    X, columns, shape_swap = featurize_rows(vectorizer, fields, swap_fields, shape_scale)
    return X, (columns.swap(X, shape_swap) if columns is not None else None)


def featurize_rows(vectorizer: FeatureUnion, fields: dict[str, list[str]],
                   swap_fields: tuple[str, str] | None, shape_scale: np.ndarray | None = None,
                   mats: dict[str, sp.csr_matrix] | None = None,
                   ) -> tuple[sp.csr_matrix, PairColumns | None, sp.csr_matrix | None]:
    """The rows' features, and pairwise the layout of their n-gram columns and (with
    ``shape_scale``) the swapped view's scaled shape block: together, the swapped view.
    ``mats``: each field's TF-IDF rows when already computed (else transformed here)."""
    names = list(fields)
    if mats is None:
        mats = {name: vectorizer.transform(fields[name]).tocsr() for name in names}
    if swap_fields is None:
        X, columns = mats[names[0]], None
    else:
        X = _pair(mats, names, *swap_fields)
        columns = PairColumns((_pair_group(len(names), mats[names[0]].shape[1]),))
    if shape_scale is None:
        return X, columns, None
    shapes = shape_block(fields, swap_fields)
    X = sp.hstack([X, _scaled(shapes, shape_scale)], format="csr", dtype=np.float32)
    if swap_fields is None:
        return X, None, None
    # the raw counts swap by a permutation; the scale is per column, so it is applied after
    shape_columns = PairColumns((_pair_group(len(names), shapes.shape[1] // (len(names) + 1)),))
    return X, columns, _scaled(shape_columns.swap_dense(shapes), shape_scale)


def _scaled(shapes: np.ndarray, shape_scale: np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix(shapes / shape_scale)


def _pair_group(n_fields: int, width: int) -> tuple[int, int]:
    """The (others, one field) widths of a pair group of ``n_fields`` fields ``width`` wide."""
    return (n_fields - 2) * width, width


def shape_block(fields: dict[str, list[str]], swap_fields: tuple[str, str] | None) -> np.ndarray:
    """(n, 6 * fields [+ 6]) float32 log length and structure counts (characters, words,
    lines, list items, code blocks, headers) of every field; pairwise also first - second,
    the length difference LMSYS solutions found strong."""
    counts = {name: log_counts(texts) for name, texts in fields.items()}
    if swap_fields is None:
        return np.hstack(list(counts.values()))
    a, b = swap_fields
    others = [counts[n] for n in fields if n not in (a, b)]
    return np.hstack([*others, counts[a], counts[b], counts[a] - counts[b]])


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
    if exp.cfg.tfidf.shape_features:  # only when on: matrices cached before it stay valid
        params["shape_features"] = True
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
