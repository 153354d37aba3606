"""Extending the package: a head kind through the registry alone (one class, one line), and
a stage whose model folder predicts with no predict code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator

import hybridstack
from hybridstack.commands.audit import run_audit
from hybridstack.config import EXTRA_HEAD_LISTS, Section
from hybridstack.experiment import Experiment, open_experiment
from hybridstack.features.lengths import log_counts
from hybridstack.heads.base import FoldStore, fit_oof
from hybridstack.heads.logreg import LogRegHead
from hybridstack.heads.registry import EMBED_HEADS, HeadKind, register
from hybridstack.runs import FEATURIZER_FILE, write_joblib
from hybridstack.stages import embed, stack
from hybridstack.stages.common import save_model_outputs, stage_experiment

EMBED = {"enabled": True, "model": "embedded:minilm", "prefix": "", "max_seq_length": 32,
         "knn": False, "lgbm": [], "mlp": []}


class RidgeSpec(Section):
    """A toy head kind's settings (the list [[embed.ridge]])."""

    name: str = "ridge"
    C: float = 0.5


class RidgeHead(BaseEstimator):
    """A toy head: logistic regression with its own C."""

    def __init__(self, multilabel: bool = False, C: float = 0.5):
        self.multilabel, self.C = multilabel, C

    def fit(self, X, Y, X_val=None, Y_val=None):
        self.model_ = LogRegHead(multilabel=self.multilabel, C=self.C).fit(X, Y)
        return self

    def predict_proba(self, X):
        return self.model_.predict_proba(X)


@pytest.fixture
def ridge_registered(monkeypatch):
    monkeypatch.setattr("hybridstack.heads.registry.EMBED_HEADS", dict(EMBED_HEADS))
    monkeypatch.setattr("hybridstack.config.EXTRA_HEAD_LISTS", dict(EXTRA_HEAD_LISTS))
    # the one line a new head kind adds to hybridstack/heads/registry.py:
    register(HeadKind("ridge", RidgeSpec, lambda spec, multilabel, seed: RidgeHead(multilabel, spec.C)))


def test_a_registered_head_trains_stacks_predicts_and_audits(make_config, ridge_registered):
    cfg, _ = make_config("multiclass", n_train=90, n_test=20,
                         embed={**EMBED, "ridge": [{"name": "ridge", "C": 2.0}]},
                         stack={"enabled": True, "methods": ["weighted"]})
    assert [h.C for h in cfg.embed.head_list("ridge")] == [2.0]
    embed.run(cfg)
    model = cfg.run_dir / "models" / "minilm_ridge"
    assert (model / "DONE").is_file() and (model / "fold_0" / "model.joblib").is_file()
    settings = pd.read_json(model / "config.json", typ="series")["settings"]
    assert "ridge" not in settings["embed"]  # a head list never leaks into the shared settings
    stack.run(cfg)
    predictor = hybridstack.load(cfg.run_dir)
    test = pd.read_csv(cfg.data.test, dtype=str, keep_default_na=False)
    np.testing.assert_allclose(predictor.predict_proba(test),
                               np.load(cfg.run_dir / "stack" / "test.npy"), atol=1e-6)
    checks = {c.name: c for c in run_audit(cfg.run_dir, permutation_rows=90)}
    assert checks["permutation minilm_ridge"].status == "PASS"
    assert checks["oof minilm_ridge"].status == "PASS"


def test_an_unregistered_head_list_is_an_unknown_key(make_config):
    from hybridstack.errors import HybridstackError

    with pytest.raises(HybridstackError, match="unknown config key 'embed.ridge'"):
        make_config("multiclass", embed={**EMBED, "ridge": [{"name": "ridge"}]})


class LengthFeaturizer:
    """A toy stage's featurizer: log length/structure counts of the text."""

    def transform(self, ds):
        return log_counts(ds.fields["text"]), None


def run_length_stage(exp: Experiment) -> None:
    """A toy stage (not in STAGE_ORDER): logistic regression on text lengths."""
    exp = stage_experiment(exp, "tfidf")
    featurizer, model = LengthFeaturizer(), exp.dir.model("length_logreg")
    X = featurizer.transform(exp.train)[0]
    X_test = featurizer.transform(exp.test)[0]
    head = LogRegHead(multilabel=False, C=1.0)
    result = fit_oof(head, X, exp.train.Y, exp.folds, X_test, score=exp.task.score,
                     store=FoldStore(model.path, "toy"))
    write_joblib(model.path / FEATURIZER_FILE, featurizer)
    save_model_outputs(exp, model, result, {"swap_tta": False}, "toy", stage="length")


def test_a_new_stage_predicts_without_predict_code(make_config):
    cfg, _ = make_config("multiclass", n_train=90, n_test=20,
                         stack={"enabled": True, "methods": ["weighted"]})
    exp = open_experiment(cfg)
    run_length_stage(exp)
    stack.run(exp)
    predictor = hybridstack.load(cfg.run_dir)
    assert [m.name for m in predictor.base_models] == ["length_logreg"]
    test = pd.read_csv(cfg.data.test, dtype=str, keep_default_na=False)
    np.testing.assert_allclose(predictor.predict_base(test)["length_logreg"],
                               np.load(cfg.run_dir / "models" / "length_logreg" / "test.npy"),
                               atol=1e-6)
    assert Path(cfg.run_dir / "submission.csv").is_file()
