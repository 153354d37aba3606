import numpy as np
import pytest

from hybridstack.errors import HybridstackError
from hybridstack.folds import fold_rows, make_folds


def test_deterministic_and_seed_dependent():
    y = np.repeat([0, 1, 2], 30)
    a = make_folds(y, 5, seed=42)
    assert a.dtype == np.int8
    assert np.array_equal(a, make_folds(y, 5, seed=42))
    assert not np.array_equal(a, make_folds(y, 5, seed=7))


def test_stratified_classes_spread_evenly():
    y = np.repeat([0, 1], [80, 20])
    folds = make_folds(y, 5, seed=0)
    for k in range(5):
        _, valid = fold_rows(folds, k)
        assert (y[valid] == 1).sum() == 4


def test_groups_never_span_two_folds():
    rng = np.random.default_rng(0)
    groups = np.array([f"prompt{i}" for i in rng.integers(0, 40, size=300)], dtype=object)
    y = rng.integers(0, 3, size=300)
    folds = make_folds(y, 5, seed=42, groups=groups)
    for g in np.unique(groups):
        assert len(np.unique(folds[groups == g])) == 1
    assert set(folds.tolist()) == set(range(5))


def test_multilabel_iterative_stratification():
    rng = np.random.default_rng(0)
    Y = (rng.random((500, 6)) < [0.4, 0.05, 0.2, 0.03, 0.2, 0.05]).astype(int)
    folds = make_folds(Y, 5, seed=42)
    per_fold = np.array([Y[folds == k].sum(0) for k in range(5)])
    # every label's positives are spread within +-1 of an even split (rare labels included)
    assert (per_fold.max(0) - per_fold.min(0) <= 2).all()


def test_partition_and_errors():
    y = np.array([0, 1] * 10)
    folds = make_folds(y, 4, seed=1)
    seen = np.concatenate([fold_rows(folds, k)[1] for k in range(4)])
    assert sorted(seen.tolist()) == list(range(20))  # each row validated exactly once
    with pytest.raises(HybridstackError, match="cannot be split"):
        make_folds(np.array([0, 1]), 5, seed=0)
    with pytest.raises(HybridstackError, match="distinct groups"):
        make_folds(y, 4, seed=0, groups=np.array(["g"] * 20))
