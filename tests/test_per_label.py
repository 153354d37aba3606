"""The one per-label fitter every multilabel head and meta-model uses."""

import numpy as np
from scipy import sparse

from hybridstack.heads.logreg import LogRegHead
from hybridstack.heads.per_label import fit_per_label, fitted_models, predict_per_label


def test_a_label_with_one_class_keeps_its_rate_and_is_not_fitted():
    Y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=np.float32)
    fitted = []
    models = fit_per_label(Y, lambda j: fitted.append(j) or f"model{j}")
    assert fitted == [0] and models == ["model0", 0.0, 1.0]
    proba = predict_per_label(models, lambda m: np.full(2, 0.25), n_rows=2)
    np.testing.assert_array_equal(proba, [[0.25, 0.0, 1.0], [0.25, 0.0, 1.0]])
    assert proba.dtype == np.float32 and fitted_models(models) == ["model0"]


def test_logreg_multilabel_with_a_label_absent_from_the_fold():
    rng = np.random.default_rng(0)
    X = sparse.csr_matrix(rng.random((80, 5)))
    Y = np.zeros((80, 2), dtype=np.float32)
    Y[:, 0] = X[:, 0].toarray().ravel() > 0.5
    head = LogRegHead(multilabel=True).fit(X, Y)
    assert head.models_[1] == 0.0
    proba = head.predict_proba(X)
    assert (proba[:, 1] == 0).all() and ((proba[:, 0] > 0.5) == Y[:, 0].astype(bool)).mean() > 0.8
    assert not head.decision_terms(X, 1).sum()  # a constant label explains nothing
