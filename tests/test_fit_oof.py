import numpy as np
import scipy.sparse as sp

from hybridstack.folds import make_folds
from hybridstack.heads.base import FoldStore, SwapView, fit_oof
from hybridstack.heads.logreg import LogRegHead
from hybridstack.tasks import mean_column_auc, multiclass_log_loss


def _data(n=150, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    y = (X[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(int) + (X[:, 1] > 1)
    return X, np.eye(3, dtype=np.float32)[y], y


class RecordingHead(LogRegHead):
    """Records which rows it was trained on, to check the held-out fold never is."""

    seen: list = []

    def fit(self, X, Y, X_val=None, Y_val=None):
        RecordingHead.seen.append(set(map(tuple, np.round(X, 6))))
        return super().fit(X, Y)


def test_oof_rows_partition_and_no_leak():
    X, Y, y = _data()
    folds = make_folds(y, 5, seed=42)
    RecordingHead.seen = []
    result = fit_oof(RecordingHead(), X, Y, folds, X[:10], score=multiclass_log_loss)
    assert not np.isnan(result.oof).any()  # every row validated
    assert result.oof.dtype == np.float32 and result.test_pred.shape == (10, 3)
    np.testing.assert_allclose(result.oof.sum(1), 1, atol=1e-5)
    for k, trained_rows in enumerate(RecordingHead.seen):
        held_out = {tuple(np.round(r, 6)) for r in X[folds == k]}
        assert not trained_rows & held_out
    assert len(result.fold_scores) == 5


def test_only_some_folds_leave_nan():
    X, Y, y = _data()
    folds = make_folds(y, 5, seed=42)
    result = fit_oof(LogRegHead(), X, Y, folds, score=multiclass_log_loss, only_folds=[0])
    covered = ~np.isnan(result.oof).any(1)
    assert np.array_equal(covered, folds == 0)
    assert result.test_pred is None


def test_swap_tta_makes_predictions_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 3)), rng.normal(size=(200, 3))
    X, X_swap = np.hstack([a, b, a - b]), np.hstack([b, a, b - a])
    winner = np.where(a.sum(1) > b.sum(1) + 0.5, 0, np.where(b.sum(1) > a.sum(1) + 0.5, 1, 2))
    Y = np.eye(3, dtype=np.float32)[winner]
    folds = make_folds(winner, 3, seed=0)
    swap = SwapView(X_swap, X_swap[:20], [1, 0, 2])
    fwd = fit_oof(LogRegHead(), X, Y, folds, X[:20], score=multiclass_log_loss, swap=swap)
    swap_back = SwapView(X, X[:20], [1, 0, 2])
    rev = fit_oof(LogRegHead(), X_swap, Y[:, [1, 0, 2]], folds, X_swap[:20],
                  score=multiclass_log_loss, swap=swap_back)
    # predicting the swapped rows gives the same probabilities with winner columns swapped
    np.testing.assert_allclose(fwd.test_pred, rev.test_pred[:, [1, 0, 2]], atol=1e-5)
    assert fwd.fold_scores[0] < np.log(3)


def test_multilabel_sparse_and_store_resume(tmp_path):
    rng = np.random.default_rng(0)
    X = sp.random(120, 30, density=0.3, random_state=0, format="csr")
    Y = np.column_stack([(X[:, 0].toarray().ravel() > 0), rng.random(120) < 0.3]).astype(np.float32)
    folds = make_folds(Y, 3, seed=0)
    store = FoldStore(tmp_path / "m", "hash1")
    first = fit_oof(LogRegHead(multilabel=True), X, Y, folds, X[:5], score=mean_column_auc, store=store)
    assert (tmp_path / "m" / "fold_0" / "model.joblib").is_file()

    class Exploding(LogRegHead):
        def fit(self, *a, **k):
            raise AssertionError("finished folds must be loaded, not refitted")

    again = fit_oof(Exploding(multilabel=True), X, Y, folds, X[:5], score=mean_column_auc, store=store)
    np.testing.assert_array_equal(first.oof, again.oof)
    np.testing.assert_array_equal(first.test_pred, again.test_pred)
    # a different config hash never reuses the stored folds
    assert FoldStore(tmp_path / "m", "hash2").load(0) is None
