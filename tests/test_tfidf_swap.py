"""The pairwise TF-IDF swapped view as a column permutation (PairColumns) instead of a cached
swapped matrix: it equals the swapped pair featurised entry for entry, and the stage's
predictions are bit-identical to those from a (older) cache that holds the swapped matrices."""

from __future__ import annotations

import shutil

import joblib
import numpy as np
import pytest
import scipy.sparse as sp

from hybridstack.experiment import open_experiment
from hybridstack.features.pair_columns import PairColumns
from hybridstack.features.tfidf import (
    TfidfFeatures,
    TfidfFeaturizer,
    matrix_cache_path,
    shape_block,
)
from hybridstack.folds import make_folds
from hybridstack.heads.base import SwapView, fit_oof
from hybridstack.heads.logreg import LogRegHead
from hybridstack.runs import ExperimentDir
from hybridstack.stages import tfidf
from hybridstack.tasks import multiclass_log_loss


def assert_same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    """Same shape and the same stored entries in the same order, bit for bit."""
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


def pair_blocks(n: int = 60, width: int = 7, seed: int = 0):
    """(prompt, a, b): sparse float32 blocks; a and b share some entries, so a - b has
    cancelled zeros, as responses sharing n-grams do."""
    rng = np.random.default_rng(seed)
    prompt, a = (sp.random(n, width, density=0.4, format="csr", dtype=np.float32, random_state=rng)
                 for _ in range(2))
    b = sp.random(n, width, density=0.4, format="csr", dtype=np.float32, random_state=rng)
    b = (b + a.multiply(rng.random((n, width)) < 0.5)).tocsr()
    return prompt, a, b


def stacked(*blocks) -> sp.csr_matrix:
    return sp.hstack(blocks, format="csr", dtype=np.float32)


def test_swap_is_the_swapped_pair_featurised_and_its_own_inverse():
    prompt, a, b = pair_blocks()
    X, X_swap = stacked(prompt, a, b, a - b), stacked(prompt, b, a, b - a)
    columns = PairColumns(((7, 7),))
    assert_same_csr(columns.swap(X), X_swap)
    assert_same_csr(columns.swap(X_swap), X)
    assert_same_csr(columns.swap(X[[5, 2, 9]]), X_swap[[5, 2, 9]])


def test_swap_replaces_the_tail_columns_and_checks_the_width():
    prompt, a, b = pair_blocks()
    tail, tail_swap = (sp.random(60, 3, density=0.5, format="csr", dtype=np.float32,
                                 random_state=seed) for seed in (1, 2))
    X = stacked(prompt, a, b, a - b, tail)
    columns = PairColumns(((7, 7),))
    assert_same_csr(columns.swap(X, tail_swap), stacked(prompt, b, a, b - a, tail_swap))
    with pytest.raises(ValueError, match="28 columns"):
        columns.swap(X)  # the tail's columns are no part of the permutation


def test_dense_swap_of_two_groups():
    rng = np.random.default_rng(0)
    o, a, b = rng.normal(size=(5, 2)), rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    p, c, d = rng.normal(size=(5, 0)), rng.normal(size=(5, 1)), rng.normal(size=(5, 1))
    A = np.hstack([o, a, b, a - b, p, c, d, c - d])
    expected = np.hstack([o, b, a, b - a, p, d, c, d - c])
    np.testing.assert_array_equal(PairColumns(((2, 3), (0, 1))).swap_dense(A), expected)


@pytest.mark.parametrize("augment,tta", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("with_tail", [False, True])
def test_fit_oof_with_columns_equals_the_materialised_swap(augment, tta, with_tail):
    prompt, a, b = pair_blocks(n=90)
    winner = np.asarray(a.sum(1) - b.sum(1)).ravel()
    winner = np.where(winner > 0.3, 0, np.where(winner < -0.3, 1, 2))
    Y = np.eye(3, dtype=np.float32)[winner]
    blocks, blocks_swap = [prompt, a, b, a - b], [prompt, b, a, b - a]
    tail = tail_swap = None
    if with_tail:  # per-row values that are no column permutation, like scaled shape counts
        rng = np.random.default_rng(3)
        tail, tail_swap = (sp.csr_matrix(rng.random((90, 2), dtype=np.float32)) for _ in range(2))
        blocks, blocks_swap = blocks + [tail], blocks_swap + [tail_swap]
    X, X_swap = stacked(*blocks), stacked(*blocks_swap)
    folds = make_folds(winner, 3, seed=0)
    test_rows = np.arange(20)
    materialised = SwapView(X_swap, X_swap[test_rows], [1, 0, 2], augment=augment, tta=tta)
    by_columns = SwapView(tail_swap, None if tail is None else tail_swap[test_rows], [1, 0, 2],
                          augment=augment, tta=tta, columns=PairColumns(((7, 7),)))
    results = [fit_oof(LogRegHead(), X, Y, folds, X[test_rows], score=multiclass_log_loss,
                       swap=swap) for swap in (materialised, by_columns)]
    np.testing.assert_array_equal(results[0].oof, results[1].oof)
    np.testing.assert_array_equal(results[0].test_pred, results[1].test_pred)
    plain = fit_oof(LogRegHead(), X, Y, folds, X[test_rows], score=multiclass_log_loss)
    assert not np.array_equal(plain.oof, results[1].oof)  # the swap was used at all


def materialised_swap(features: TfidfFeatures, fields: dict[str, list[str]],
                      swap_fields: tuple[str, str]) -> sp.csr_matrix:
    """The swapped matrix as hybridstack built and cached it before PairColumns:
    [others, B, A, B - A] (+ the swapped pair's shape counts, scaled per column)."""
    a, b = swap_fields
    mats = {name: features.vectorizer.transform(texts).tocsr() for name, texts in fields.items()}
    others = [mats[n] for n in fields if n not in (a, b)]
    blocks = [*others, mats[b], mats[a], mats[b] - mats[a]]
    if features.shape_scale is not None:
        blocks.append(sp.csr_matrix(shape_block(fields, (b, a)) / features.shape_scale))
    return stacked(*blocks)


@pytest.mark.parametrize("shape_features", [False, True])
def test_stage_predictions_equal_those_of_an_old_cache_with_swapped_matrices(
        make_config, shape_features):
    cfg, _ = make_config("pairwise", n_train=120, n_test=30,
                         tfidf={"shape_features": shape_features})
    tfidf.run(cfg)
    model = ExperimentDir(cfg.run_dir).model("tfidf_logreg")
    new_oof, new_test = model.load_oof(), model.load_test()

    exp = open_experiment(cfg)
    path = matrix_cache_path(exp)
    features = joblib.load(path)
    assert features.X_swap is None and features.X_test_swap is None  # nothing swapped cached
    assert (features.shape_swap is not None) == shape_features
    swap_fields = exp.task.swap_fields
    X_swap = materialised_swap(features, exp.train.fields, swap_fields)
    X_test_swap = materialised_swap(features, exp.test.fields, swap_fields)
    assert_same_csr(features.columns.swap(features.X, features.shape_swap), X_swap)
    # predict featurises new rows to the same two views
    ds_X, ds_X_swap = TfidfFeaturizer(features.vectorizer, swap_fields,
                                      features.shape_scale).transform(exp.test)
    assert_same_csr(ds_X, features.X_test)
    assert_same_csr(ds_X_swap, X_test_swap)

    # a cache pickled before PairColumns: the swapped matrices set, no layout attributes
    old = TfidfFeatures(features.X, features.X_test, X_swap, X_test_swap,
                        features.vectorizer, features.shape_scale)
    for name in ("columns", "shape_swap", "shape_test_swap"):
        del old.__dict__[name]
    joblib.dump(old, path)
    shutil.rmtree(model.path)
    tfidf.run(cfg)
    np.testing.assert_array_equal(model.load_oof(), new_oof)
    np.testing.assert_array_equal(model.load_test(), new_test)


@pytest.mark.parametrize("kind", ["pairwise", "multiclass"])
def test_one_pass_fit_transform_equals_fit_then_transform(kind):
    """build_tfidf analyses each text once (fit_transform, then row slices); every split's
    matrix is bit-identical to transforming it with the fitted vectorizer."""
    from hybridstack.config import TfidfConfig
    from hybridstack.features.tfidf import build_tfidf, featurize_rows

    rng = np.random.default_rng(0)
    words = ["good", "bad", "answer", "code", "```", "- item", "# head", "x", "yes"]
    fields = (["prompt", "response_a", "response_b"] if kind == "pairwise" else ["text"])

    def split(n):
        return {f: [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(n)]
                for f in fields}

    train, test = split(40), split(15)
    swap = ("response_a", "response_b") if kind == "pairwise" else None
    cfg = TfidfConfig(max_word_features=50, max_char_features=120, min_df=1, shape_features=True)
    features = build_tfidf(cfg, train, test, swap)
    for split_fields, X in ((train, features.X), (test, features.X_test)):
        expected, _, _ = featurize_rows(features.vectorizer, split_fields, swap, features.shape_scale)
        assert_same_csr(X, expected)
