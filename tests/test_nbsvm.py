"""NB-SVM on the TF-IDF matrix: log-count ratios, multilabel and multiclass, the stage and predict."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import hybridstack
from hybridstack.cli import main
from hybridstack.heads.nbsvm import NBSVMHead, log_count_ratio
from hybridstack.runs import ExperimentDir
from hybridstack.tasks import mean_column_auc


def test_log_count_ratio_favours_features_of_the_positive_rows():
    X = sp.csr_matrix(np.array([[3, 0, 1], [2, 0, 1], [0, 4, 1], [0, 5, 1]], dtype=np.float32))
    r = log_count_ratio(X, np.array([1, 1, 0, 0]), alpha=1.0)
    assert r[0] > r[2] > r[1] and r[0] > 1 and r[1] < -1 and abs(r[2]) < 0.5


def _separable(n=300, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(n, 50, density=0.2, random_state=seed, format="csr", dtype=np.float32)
    Y = np.zeros((n, 3), dtype=np.float32)
    Y[:, 0] = np.asarray(X[:, 0].todense()).ravel() > 0
    Y[:, 1] = np.asarray(X[:, 1].todense()).ravel() > 0
    return X, Y, rng


def test_multilabel_learns_and_a_label_absent_from_the_rows_keeps_its_rate():
    X, Y, _ = _separable()
    head = NBSVMHead(multilabel=True).fit(X[:200], Y[:200])
    P = head.predict_proba(X[200:])
    assert head.models_[2] == 0.0 and (P[:, 2] == 0).all()
    assert mean_column_auc(Y[200:, :2], P[:, :2]) > 0.95
    assert head.decision_terms(X[200:], 0).shape == X[200:].shape


def test_multiclass_probabilities_sum_to_one_and_negative_features_are_refused():
    X, _, rng = _separable()
    y = np.asarray(X[:, :3].argmax(axis=1)).ravel()
    Y = np.eye(3, dtype=np.float32)[y]
    P = NBSVMHead().fit(X, Y).predict_proba(X)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-5)
    assert (P.argmax(axis=1) == y).mean() > 0.8
    with pytest.raises(ValueError, match="non-negative"):
        NBSVMHead().fit(-X, Y)


def test_the_tfidf_stage_fits_an_nbsvm_model_that_stacks_and_predicts(make_config):
    cfg, path = make_config("multilabel", n_train=150, n_test=30,
                            tfidf={"nbsvm": [{"name": "nb"}]}, stack={"enabled": True,
                                                                      "methods": ["weighted"]})
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    assert main(["run", "stack", "-c", str(path)]) == 0
    exp_dir = ExperimentDir(cfg.run_dir)
    assert exp_dir.model("nb").load_scores()["overall"] > 0.75
    test = pd.read_csv(cfg.data.test, dtype=str, keep_default_na=False)
    predicted = hybridstack.load(cfg.run_dir).predict_base(test)
    np.testing.assert_allclose(predicted["nb"], exp_dir.model("nb").load_test(), atol=1e-6)


def test_nbsvm_on_a_pairwise_task_is_one_error_line(make_config, capsys):
    cfg, path = make_config("pairwise", n_train=60, n_test=10, tfidf={"nbsvm": [{}]})
    assert main(["run", "tfidf", "-c", str(path)]) == 2
    assert "tfidf.nbsvm (tfidf_nbsvm) is for multilabel and multiclass" in capsys.readouterr().err
