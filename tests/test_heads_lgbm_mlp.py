"""LightGBM and MLP heads: early stopping, multilabel, determinism, learning, fit_oof."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from hybridstack.heads.base import fit_oof
from hybridstack.heads.lgbm import LightGBMHead
from hybridstack.heads.mlp import TorchMLPHead
from hybridstack.tasks import mean_column_auc, multiclass_log_loss


def noisy_multiclass(n: int = 400, d: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    logits = np.column_stack([X[:, 0], X[:, 1], -X[:, 0] - X[:, 1]]) + rng.normal(0, 1.0, (n, 3))
    return X, np.eye(3, dtype=np.float32)[logits.argmax(1)]


def separable_multilabel(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)).astype(np.float32)
    Y = np.column_stack([X[:, 0] > 0, X[:, 1] + X[:, 2] > 0.5, X[:, 3] < -1]).astype(np.float32)
    return X, Y


def small_lgbm(**kwargs) -> LightGBMHead:
    return LightGBMHead(num_threads=1, min_child_samples=5, **kwargs)


def test_lgbm_early_stopping_records_the_best_iteration():
    X, Y = noisy_multiclass()
    head = small_lgbm(n_estimators=1000, learning_rate=0.2, early_stopping_rounds=10)
    head.fit(X[:300], Y[:300], X[300:], Y[300:])
    assert 1 <= head.best_iteration_ < 1000
    assert head.boosters_[0].best_iteration == head.best_iteration_  # set by lgb.early_stopping
    proba = head.predict_proba(X[300:])
    assert proba.dtype == np.float32 and proba.shape == (100, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    # prediction uses the best iteration, not the last one
    best = head.boosters_[0].predict(X[300:], num_iteration=head.best_iteration_)
    np.testing.assert_allclose(proba, best, rtol=1e-5)


def test_lgbm_without_validation_runs_every_round():
    X, Y = noisy_multiclass(n=100)
    head = small_lgbm(n_estimators=7).fit(X, Y)
    assert head.best_iteration_ == 7


def test_lgbm_multilabel_fits_one_model_per_label_and_handles_a_constant_label():
    X, Y = separable_multilabel()
    Y[:, 2] = 0.0  # a label absent from this training fold
    head = small_lgbm(multilabel=True, n_estimators=200, early_stopping_rounds=20)
    head.fit(X[:200], Y[:200], X[200:], Y[200:])
    assert len(head.boosters_) == 3 and head.boosters_[2] == 0.0
    proba = head.predict_proba(X[200:])
    assert proba.shape == (100, 3)
    assert (proba[:, 2] == 0.0).all()
    assert mean_column_auc(Y[200:, :2], proba[:, :2]) > 0.9


def test_lgbm_is_deterministic():
    X, Y = noisy_multiclass()
    first = small_lgbm(n_estimators=30).fit(X, Y).predict_proba(X)
    second = small_lgbm(n_estimators=30).fit(X, Y).predict_proba(X)
    np.testing.assert_array_equal(first, second)


def mlp(**kwargs) -> TorchMLPHead:
    settings = {"hidden_sizes": (32,), "max_epochs": 30, "patience": 5, "batch_size": 64, **kwargs}
    return TorchMLPHead(**settings)


def test_mlp_same_seed_gives_identical_predictions_other_seed_differs():
    X, Y = noisy_multiclass()
    first = mlp(random_state=3).fit(X[:300], Y[:300], X[300:], Y[300:]).predict_proba(X)
    second = mlp(random_state=3).fit(X[:300], Y[:300], X[300:], Y[300:]).predict_proba(X)
    other = mlp(random_state=4).fit(X[:300], Y[:300], X[300:], Y[300:]).predict_proba(X)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_mlp_seeding_leaves_the_global_torch_stream_alone():
    X, Y = noisy_multiclass(n=100)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    mlp(max_epochs=2).fit(X, Y)
    assert torch.equal(torch.rand(3), expected)


def test_mlp_learns_a_separable_single_label_problem():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5)).astype(np.float32) * 10 + 3  # far from standardised
    Y = np.eye(2, dtype=np.float32)[(X[:, 0] - X[:, 1] > 0).astype(int)]
    head = mlp(max_epochs=60, lr=3e-3).fit(X[:300], Y[:300], X[300:], Y[300:])
    proba = head.predict_proba(X[300:])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(proba.argmax(1) == Y[300:].argmax(1)) > 0.95
    assert 1 <= head.best_iteration_ <= 60


def test_mlp_multilabel_uses_independent_sigmoids():
    X, Y = separable_multilabel()
    head = mlp(multilabel=True, max_epochs=60, lr=3e-3).fit(X[:200], Y[:200], X[200:], Y[200:])
    proba = head.predict_proba(X[200:])
    assert not np.allclose(proba.sum(axis=1), 1.0)
    assert mean_column_auc(Y[200:], proba) > 0.95


def test_mlp_early_stopping_stops_on_noise_and_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20)).astype(np.float32)
    Y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 300)]  # labels carry no signal
    head = mlp(hidden_sizes=(128,), max_epochs=200, patience=3, lr=1e-2)
    head.fit(X[:200], Y[:200], X[200:], Y[200:])
    assert head.best_iteration_ < 50  # it stopped long before max_epochs
    val_loss = multiclass_log_loss(Y[200:], head.predict_proba(X[200:]))
    assert val_loss == pytest.approx(head.best_loss_, rel=1e-4)


@pytest.mark.parametrize("make_head", [lambda: small_lgbm(n_estimators=50, multilabel=True),
                                       lambda: mlp(multilabel=True)])
def test_heads_fill_every_oof_row_through_fit_oof(make_head):
    X, Y = separable_multilabel()
    folds = np.arange(len(X)) % 3
    result = fit_oof(make_head(), X, Y, folds, X[:20], score=mean_column_auc)
    assert result.oof.shape == Y.shape and not np.isnan(result.oof).any()
    assert result.test_pred.shape == (20, 3)
    assert roc_auc_score(Y[:, 0], result.oof[:, 0]) > 0.8
    assert all(info["best_iteration"] >= 1 for info in result.fold_info.values())
