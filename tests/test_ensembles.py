"""Stackers on synthetic OOF matrices: constraints, honesty of nested CV, thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator
from sklearn.neighbors import KNeighborsClassifier

from hybridstack.ensembles import make_stacker
from hybridstack.ensembles.inputs import StackInput
from hybridstack.ensembles.meta import LGBMMeta, LogRegMeta, NonNegativeLogReg, SelectModel
from hybridstack.ensembles.nested import (
    SINGLE_PREFIX,
    NestedResult,
    choose,
    nested_oof,
    selected_oof,
)
from hybridstack.ensembles.thresholds import apply_thresholds, held_out_thresholds, tune_thresholds
from hybridstack.ensembles.weighted import WeightedBlend, rank_auc
from hybridstack.tasks import mean_column_auc, multiclass_log_loss

N, K = 600, 3
FOLDS = np.arange(N) % 3


def multilabel_inputs(seed: int = 0, noise=(1.0, 1.0, 3.0)) -> tuple[StackInput, np.ndarray]:
    """Three base models seeing a shared latent signal through independent noise (model 2 weak)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(N, K))
    Y = (latent + 0.5 * rng.normal(size=(N, K)) > 0.8).astype(np.float32)
    probs = np.stack([expit(2 * latent + s * rng.normal(size=(N, K))) for s in noise], axis=1)
    return StackInput(probs.astype(np.float32), multilabel=True), Y


def multiclass_inputs(seed: int = 0) -> tuple[StackInput, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(N, K))
    Y = np.eye(K, dtype=np.float32)[(latent + 0.7 * rng.normal(size=(N, K))).argmax(1)]
    # model 0 informative but over-confident, model 1 informative, model 2 noise
    probs = np.stack([softmax(4 * latent + 2 * rng.normal(size=(N, K)), axis=1),
                      softmax(latent + 0.8 * rng.normal(size=(N, K)), axis=1),
                      softmax(rng.normal(size=(N, K)), axis=1)], axis=1)
    return StackInput(probs.astype(np.float32)), Y


def single_scores(X: StackInput, Y: np.ndarray, score) -> list[float]:
    return [score(Y, X.probs[:, m]) for m in range(X.n_models)]


# -- the weighted blend ------------------------------------------------------------------------


def test_rank_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # with ties
    assert rank_auc(y, s) == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("make", [multilabel_inputs, multiclass_inputs])
def test_weights_are_non_negative_and_sum_to_one(make):
    X, Y = make()
    blend = WeightedBlend().fit(X, Y)
    weights = np.atleast_2d(blend.weights_)
    assert (weights >= 0).all()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-9)
    P = blend.predict_proba(X)
    assert P.shape == Y.shape and P.dtype == np.float32
    assert np.isfinite(P).all() and (P >= 0).all() and (P <= 1).all()


def test_weighted_blend_multiclass_beats_each_model_and_downweights_noise():
    X, Y = multiclass_inputs()
    blend = WeightedBlend().fit(X, Y)
    blended = multiclass_log_loss(Y, blend.predict_proba(X))
    assert blended < min(single_scores(X, Y, multiclass_log_loss))
    assert blend.weights_[2] < 0.1  # the pure-noise model gets (almost) nothing
    np.testing.assert_allclose(blend.predict_proba(X).sum(axis=1), 1.0, atol=1e-5)


def test_temperature_fixes_an_over_confident_model():
    X, Y = multiclass_inputs()
    only_confident = StackInput(X.probs[:, :1])
    with_t = WeightedBlend(temperature=True).fit(only_confident, Y)
    without_t = WeightedBlend(temperature=False).fit(only_confident, Y)
    assert with_t.temperature_ > 1.0  # softens the over-confident model
    assert (multiclass_log_loss(Y, with_t.predict_proba(only_confident))
            < multiclass_log_loss(Y, without_t.predict_proba(only_confident)))


def test_weighted_blend_multilabel_auc_beats_each_model():
    X, Y = multilabel_inputs()
    blend = WeightedBlend().fit(X, Y)
    assert mean_column_auc(Y, blend.predict_proba(X)) > max(single_scores(X, Y, mean_column_auc))
    assert (blend.weights_[:, 2] < blend.weights_[:, 0]).all()  # the noisy model weighs less


def test_multilabel_blend_is_per_row_and_batch_independent():
    X, Y = multilabel_inputs()
    blend = WeightedBlend().fit(X, Y)
    whole = blend.predict_proba(X)
    np.testing.assert_allclose(blend.predict_proba(X[np.arange(5)]), whole[:5], rtol=1e-6)


# -- meta-models ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [multilabel_inputs, multiclass_inputs])
@pytest.mark.parametrize("stacker", [LogRegMeta(), LGBMMeta()], ids=["logreg", "lgbm"])
def test_meta_models_learn_on_held_out_rows(make, stacker):
    X, Y = make()
    multilabel = X.multilabel
    score = mean_column_auc if multilabel else multiclass_log_loss
    result = nested_oof(stacker, X, Y, FOLDS, score)
    best_single = (max if multilabel else min)(single_scores(X, Y, score))
    # an honest meta-model at least matches the weakest single model, and is well-formed
    assert not np.isnan(result.oof).any()
    worst_single = (min if multilabel else max)(single_scores(X, Y, score))
    assert (result.overall > worst_single) if multilabel else (result.overall < worst_single)
    assert abs(result.overall - best_single) < 0.1


def test_meta_models_are_reproducible():
    X, Y = multilabel_inputs()
    for make in (LogRegMeta, LGBMMeta):
        a = make().fit(X, Y).predict_proba(X)
        b = make().fit(X, Y).predict_proba(X)
        np.testing.assert_array_equal(a, b)


def test_lgbm_uses_meta_features_when_they_carry_the_signal():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, N)
    Y = np.column_stack([y, 1 - y]).astype(np.float32)
    noise = rng.uniform(0.2, 0.8, size=(N, 2, 2)).astype(np.float32)
    meta = (y + 0.3 * rng.normal(size=N))[:, None].astype(np.float32)  # e.g. a length feature
    with_meta = nested_oof(LGBMMeta(), StackInput(noise, meta, True), Y, FOLDS, mean_column_auc)
    without = nested_oof(LGBMMeta(), StackInput(noise, None, True), Y, FOLDS, mean_column_auc)
    assert with_meta.overall > 0.85 > 0.65 > without.overall


def test_rare_label_predicts_its_rate():
    X, Y = multilabel_inputs()
    Y[:, 1] = 0
    Y[0, 1] = 1  # one positive: too few for an inner CV
    for stacker in (LogRegMeta(), LGBMMeta()):
        P = stacker.fit(X, Y).predict_proba(X)
        np.testing.assert_allclose(P[:, 1], 1 / N, rtol=1e-5)


def test_summaries_give_one_share_per_model_summing_to_one():
    X, Y = multilabel_inputs()
    for name in ("weighted", "logreg", "lgbm"):
        summary = make_stacker(name).fit(X, Y).summary()
        assert len(summary["weights"]) == X.n_models
        assert sum(summary["weights"]) == pytest.approx(1.0)
        assert min(summary["weights"]) >= 0


def test_select_model_passes_one_model_through():
    X, Y = multiclass_inputs()
    np.testing.assert_array_equal(SelectModel(index=1).fit(X, Y).predict_proba(X), X.probs[:, 1])


# -- nested CV honesty -----------------------------------------------------------------------


class NearestRowStacker(BaseEstimator):
    """A stacker that memorises its training rows: 1-NN on the flattened base predictions."""

    def fit(self, X: StackInput, Y, X_val=None, Y_val=None):
        self.knn_ = KNeighborsClassifier(n_neighbors=1).fit(X.probs.reshape(len(X), -1), Y)
        return self

    def predict_proba(self, X: StackInput):
        return self.knn_.predict(X.probs.reshape(len(X), -1)).astype(np.float32)


def test_nested_score_catches_a_memorising_stacker():
    rng = np.random.default_rng(7)
    X = StackInput(rng.uniform(size=(N, 2, K)).astype(np.float32), multilabel=True)
    Y = (rng.uniform(size=(N, K)) < 0.3).astype(np.float32)  # labels unrelated to the inputs
    stacker = NearestRowStacker()
    in_sample = mean_column_auc(Y, stacker.fit(X, Y).predict_proba(X))
    nested = nested_oof(stacker, X, Y, FOLDS, mean_column_auc)
    assert in_sample == 1.0
    assert nested.overall < 0.6  # chance level: the held-out labels were never seen


class RowSpy(BaseEstimator):
    """Records which rows (by id, carried as a meta feature) each fit saw."""

    seen: list = []

    def fit(self, X: StackInput, Y, X_val=None, Y_val=None):
        RowSpy.seen.append(set(X.meta[:, 0].astype(int).tolist()))
        self.rate_ = Y.mean(axis=0)
        return self

    def predict_proba(self, X: StackInput):
        RowSpy.seen.append(("predict", set(X.meta[:, 0].astype(int).tolist())))
        return np.tile(self.rate_, (len(X), 1)).astype(np.float32)


def test_nested_cv_fits_never_see_the_held_out_fold_or_excluded_rows():
    X, Y = multilabel_inputs()
    X = StackInput(X.probs, np.arange(N, dtype=np.float32)[:, None], True)
    fold_id = FOLDS.copy()
    fold_id[:30] = -1  # rows some base model never validated
    RowSpy.seen = []
    result = nested_oof(RowSpy(), X, Y, fold_id, mean_column_auc)
    fits, predicts = RowSpy.seen[0::2], [rows for _, rows in RowSpy.seen[1::2]]
    for fitted, predicted in zip(fits, predicts):
        assert not fitted & predicted
        assert not fitted & set(range(30)) and not predicted & set(range(30))
    assert np.isnan(result.oof[:30]).all() and not np.isnan(result.oof[30:]).any()


# -- choice and fallback ---------------------------------------------------------------------


def _result(score: float) -> NestedResult:
    return NestedResult(np.zeros((1, 1)), {0: score}, score, 0.0)


def test_choose_prefers_a_stacker_only_when_it_beats_every_single_model():
    results = {f"{SINGLE_PREFIX}a": _result(0.80), f"{SINGLE_PREFIX}b": _result(0.85),
               "weighted": _result(0.86), "lgbm": _result(0.84)}
    assert choose(results, greater_is_better=True).name == "weighted"
    results["weighted"] = _result(0.85)  # a tie is not a win
    choice = choose(results, greater_is_better=True)
    assert choice.name == f"{SINGLE_PREFIX}b" and "falling back" in choice.note


def test_choose_handles_lower_is_better_and_a_single_model():
    results = {f"{SINGLE_PREFIX}a": _result(0.9), "logreg": _result(0.8)}
    assert choose(results, greater_is_better=False).name == "logreg"
    only = choose({f"{SINGLE_PREFIX}a": _result(0.9)}, greater_is_better=False)
    assert only.name == f"{SINGLE_PREFIX}a" and "only one base model" in only.note


# -- thresholds and inputs -------------------------------------------------------------------


def test_thresholds_maximise_f1():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 400), 0, 1)
    Y, P = y[:, None].astype(np.float32), p[:, None]
    tuned = tune_thresholds(Y, P, ["x"])["x"]
    labels = apply_thresholds(P, {"x": tuned}, ["x"])[:, 0]
    tp = int((labels & y).sum())
    f1 = 2 * tp / (labels.sum() + y.sum())
    assert f1 == pytest.approx(tuned["f1"])
    for cut in np.linspace(0.05, 0.95, 19):  # no fixed cut does better
        pred = (p >= cut).astype(int)
        assert 2 * (pred & y).sum() / (pred.sum() + y.sum()) <= tuned["f1"] + 1e-12
    assert tuned["support"] == y.sum()


def test_thresholds_of_a_label_without_positives():
    Y = np.zeros((10, 1), dtype=np.float32)
    assert tune_thresholds(Y, np.full((10, 1), 0.2), ["x"])["x"]["f1"] == 0.0


def test_stack_input_rows_and_coverage():
    probs = np.full((4, 2, 3), 0.5, dtype=np.float32)
    probs[1, 0] = np.nan
    X = StackInput(probs, np.arange(4, dtype=np.float32)[:, None])
    np.testing.assert_array_equal(X.covered_rows(), [True, False, True, True])
    assert X[np.array([2, 3])].meta[:, 0].tolist() == [2, 3]
    assert X.flat_logits().shape == (4, 6)


# -- the choice inside the nest ----------------------------------------------------------------


def _inner_folds(rows: np.ndarray) -> np.ndarray:
    return np.arange(len(rows)) % 3


def test_choosing_among_many_noise_models_is_optimistic_unless_the_choice_is_nested():
    rng = np.random.default_rng(12)
    n, m = 200, 60
    X = StackInput(rng.uniform(size=(n, m, 1)).astype(np.float32), multilabel=True)
    Y = (rng.uniform(size=(n, 1)) < 0.5).astype(np.float32)  # no model knows anything
    folds = np.arange(n) % 5
    results = {f"{SINGLE_PREFIX}{i}": nested_oof(SelectModel(index=i), X, Y, folds, mean_column_auc)
               for i in range(m)}
    best = max(r.overall for r in results.values())
    selected = selected_oof(results, X, Y, folds, mean_column_auc, True, _inner_folds)
    assert best > 0.6  # the luckiest of 60 coin flips looks like a model
    assert selected.overall < best - 0.1 and abs(selected.overall - 0.5) < 0.07


def test_a_memorising_candidate_never_wins_the_outer_selection():
    rng = np.random.default_rng(7)
    X = StackInput(rng.uniform(size=(N, 2, K)).astype(np.float32), multilabel=True)
    Y = (X.probs[:, 0, :] + 0.3 * rng.normal(size=(N, K)) > 0.5).astype(np.float32)
    results = {f"{SINGLE_PREFIX}0": nested_oof(SelectModel(index=0), X, Y, FOLDS, mean_column_auc),
               f"{SINGLE_PREFIX}1": nested_oof(SelectModel(index=1), X, Y, FOLDS, mean_column_auc),
               "memoriser": nested_oof(NearestRowStacker(), X, Y, FOLDS, mean_column_auc)}
    selected = selected_oof(results, X, Y, FOLDS, mean_column_auc, True, _inner_folds)
    assert set(selected.chosen.values()) == {f"{SINGLE_PREFIX}0"}
    np.testing.assert_array_equal(selected.oof, results[f"{SINGLE_PREFIX}0"].oof)


def test_frozen_meta_models_keep_the_settings_their_inner_cv_chose():
    X, Y = multilabel_inputs()
    logreg = LogRegMeta().fit(X, Y)
    assert logreg.frozen().C == [m.C_ for m in logreg.models_]
    lgbm = LGBMMeta().fit(X, Y)
    assert lgbm.frozen().rounds == [b.current_iteration() for b in lgbm.models_]
    for fitted in (logreg, lgbm):  # a plain fit with those settings: (nearly) the same model
        frozen = fitted.frozen().fit(X, Y)
        np.testing.assert_allclose(frozen.predict_proba(X), fitted.predict_proba(X), atol=1e-2)


def test_threshold_scores_are_reported_on_folds_they_were_not_tuned_on():
    rng = np.random.default_rng(2)
    Y = (rng.uniform(size=(400, 2)) < 0.1).astype(np.float32)
    P = rng.uniform(size=(400, 2))  # no signal: any F1 above the base rate is tuning luck
    folds = np.arange(400) % 5
    same_rows = tune_thresholds(Y, P, ["a", "b"])
    honest = held_out_thresholds(Y, P, folds, ["a", "b"])
    for name in ("a", "b"):
        assert honest[name]["threshold"] == same_rows[name]["threshold"]  # stored: all rows
        assert honest[name]["f1"] < same_rows[name]["f1"] - 0.02
        assert honest[name]["scored_on"].startswith("held-out folds")


def test_meta_models_inner_cv_keeps_a_groups_rows_together():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 3)  # three rows per prompt
    probs = rng.dirichlet([1, 1, 1], size=(120, 2)).astype(np.float32)
    X = StackInput(probs, None, False, groups.astype(str))
    y = rng.integers(3, size=120)
    for train, valid in X.inner_splits(y, 3, 42):
        assert not set(groups[train]) & set(groups[valid])
    assert X[np.arange(10)].groups.tolist() == groups[:10].astype(str).tolist()
    Y = np.eye(3, dtype=np.float32)[y]
    for meta in (LogRegMeta(), LGBMMeta()):  # fit with grouped inner CV without complaint
        assert meta.fit(X, Y).predict_proba(X).shape == (120, 3)


def flipped_inputs(seed: int = 0) -> tuple[StackInput, np.ndarray]:
    """Model 0 sees the labels; model 1 is model 0's signal upside down plus noise: a stacker
    free to weigh it negatively gains from it, as it would from a chance anti-correlation."""
    X, Y = multilabel_inputs(seed, noise=(2.0, 2.0, 3.0))
    probs = X.probs.copy()
    probs[:, 1, :] = 1 - probs[:, 1, :]
    return StackInput(probs, multilabel=True), Y


def test_non_negative_logreg_drops_a_column_that_counts_against_the_label():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    signal = rng.normal(size=2000)
    y = (signal + rng.normal(size=2000) > 0).astype(float)
    X = np.column_stack([signal + rng.normal(size=2000), -signal + rng.normal(size=2000)])
    def make():
        return make_pipeline(StandardScaler(), LogisticRegression())
    free = make().fit(X, y)[-1].coef_[0]
    assert free[0] > 0 and free[1] < 0  # unconstrained, the flipped column is used
    model = NonNegativeLogReg(make).fit(X, y)
    assert model.coef_[0, 0] > 0 and model.coef_[0, 1] == 0
    assert model.predict_proba(X).shape == (2000, 2)
    # every column against the label: nothing is used, the base rate is predicted
    only_flipped = NonNegativeLogReg(make).fit(X[:, 1:], y)
    np.testing.assert_allclose(only_flipped.predict_proba(X[:, 1:])[:, 1], y.mean())


def test_multilabel_meta_models_cannot_turn_a_model_upside_down():
    X, Y = flipped_inputs()
    logreg = LogRegMeta().fit(X, Y)
    for m in logreg.models_:  # no coefficient on any label's logit is negative
        assert (m.coef_ >= 0).all()
    # the flipped model's own-label logits are never used
    own = np.array([m.coef_[0, K + j] for j, m in enumerate(logreg.models_)])
    assert (own == 0).all()
    lgbm = LGBMMeta().fit(X, Y)
    # raising the flipped model's probabilities never lowers a prediction (unconstrained,
    # the trees learn that it should)
    up = StackInput(np.clip(X.probs + np.array([0, 0.05, 0])[None, :, None], 0, 1), multilabel=True)
    assert (lgbm.predict_proba(up) >= lgbm.predict_proba(X) - 1e-6).all()
