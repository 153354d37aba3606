"""Early stopping that does not peek: LightGBM rounds, MLP and fine-tune epochs are chosen on
an inner split of each fold's training rows, never on the held-out fold."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator

from hybridstack.experiment import open_experiment
from hybridstack.heads.base import fit_oof
from hybridstack.stages import finetune as finetune_stage
from hybridstack.tasks import multiclass_log_loss


class StopProbe(BaseEstimator):
    """An early-stopping head that records the rows it was given."""

    early_stops = True
    seen: list = []

    def fit(self, X, Y, X_val=None, Y_val=None):
        StopProbe.seen.append((X[:, 0].astype(int), X_val[:, 0].astype(int)))
        self.n_ = Y.shape[1]
        return self

    def predict_proba(self, X):
        return np.full((len(X), self.n_), 1 / self.n_, dtype=np.float32)


def test_an_early_stopping_head_never_stops_on_the_held_out_fold(make_config):
    cfg, _ = make_config("pairwise", n_train=200, n_test=10)
    exp = open_experiment(cfg)
    X = np.arange(len(exp.train), dtype=np.float32)[:, None]
    StopProbe.seen = []
    fit_oof(StopProbe(), X, exp.train.Y, exp.folds, score=multiclass_log_loss,
            stopping_rows=exp.early_stopping_split())
    prompts = np.asarray(exp.train.groups)
    for k, (fit_rows, stop_rows) in enumerate(StopProbe.seen):
        held_out = set(np.flatnonzero(exp.folds == k))
        assert not held_out & set(stop_rows) and not held_out & set(fit_rows)
        assert not set(fit_rows) & set(stop_rows)
        assert len(fit_rows) + len(stop_rows) == len(exp.train) - len(held_out)
        assert 0.05 < len(stop_rows) / (len(fit_rows) + len(stop_rows)) < 0.2
        assert not set(prompts[fit_rows]) & set(prompts[stop_rows])  # grouped like the folds
    again = exp.stopping_rows(0)
    np.testing.assert_array_equal(again[1], StopProbe.seen[0][1])  # one split per fold
    exp.cfg.cv.early_stopping = "held_out_fold"
    StopProbe.seen = []
    fit_oof(StopProbe(), X, exp.train.Y, exp.folds, score=multiclass_log_loss,
            stopping_rows=exp.early_stopping_split())
    np.testing.assert_array_equal(np.sort(StopProbe.seen[0][1]), np.flatnonzero(exp.folds == 0))


def test_the_fine_tune_chooses_its_epoch_on_inner_rows_and_predicts_the_held_out_fold(make_config):
    cfg, _ = make_config("pairwise", n_train=120, n_test=10)
    exp = open_experiment(cfg)
    n = len(exp.train)
    # token ids that name their row, so each view says which rows it holds
    views = {"train": [[i] for i in range(n)], "train_swapped": [[-i] for i in range(n)],
             "test": [[1000 + i] for i in range(10)], "test_swapped": [[-1000 - i] for i in range(10)]}
    inputs = finetune_stage.fold_inputs(exp, views, 1)
    held_out = np.flatnonzero(exp.folds == 1)
    fit_rows, stop_rows = exp.stopping_rows(1)
    assert [ids[0] for ids in inputs.valid_views[0].input_ids] == held_out.tolist()
    assert [ids[0] for ids in inputs.stop_views[0].input_ids] == stop_rows.tolist()
    assert [-ids[0] for ids in inputs.stop_views[1].input_ids] == stop_rows.tolist()  # swap TTA view
    trained = {abs(ids[0]) for ids in inputs.train.input_ids}
    assert trained == set(fit_rows.tolist())  # neither held-out nor stopping rows train
    np.testing.assert_array_equal(inputs.Y_stop, exp.train.Y[stop_rows])
    assert inputs.epoch_choice_views()[0] is inputs.stop_views
    exp.cfg.cv.early_stopping = "held_out_fold"
    assert finetune_stage.fold_inputs(exp, views, 1).stop_views is None
