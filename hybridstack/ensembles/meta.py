"""Meta-models that learn from the base models' logits, and the single-model pass-through.

All follow the head protocol with ``X`` a :class:`StackInput`. The validation pair of
``fit`` is ignored on purpose: a stacker's hyper-parameters (regularisation strength,
boosting rounds) are chosen by CV *inside* its training rows, so the held-out fold of
the nested CV never influences its own predictions.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightgbm as lgb
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from hybridstack.ensembles.inputs import StackInput
from hybridstack.heads.per_label import fit_per_label, fitted_models, predict_per_label

# Inverse regularisation strengths tried by the inner CV of the logistic meta-model.
LOGREG_CS = np.logspace(-3, 2, 11)
# LightGBM meta-model: shallow trees, strong shrinkage; the inputs are few and informative.
_LGBM_PARAMS = {
    "num_leaves": 7,
    "learning_rate": 0.05,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.8,
    "lambda_l2": 1.0,
    "verbose": -1,
    "deterministic": True,  # same CPU result on re-run
    "force_row_wise": True,
    # a meta-model sees a few dozen columns: thread start-up costs more than it saves
    # (10x slower with 2 threads on a busy 2-core machine)
    "num_threads": 1,
}
_LGBM_MAX_ROUNDS = 1000
_LGBM_EARLY_STOP = 50


def _cross_validatable(inner_folds: int):
    """A label whose rarer class has fewer rows than inner folds cannot be cross-validated."""
    def enough(y: np.ndarray) -> bool:
        positives = int((y > 0.5).sum())
        return min(positives, len(y) - positives) >= inner_folds
    return enough


def _model_shares(importance: np.ndarray, n_models: int, n_classes: int) -> list[float]:
    """Sum per-feature importance over each model's C columns; normalise to shares of 1."""
    per_model = np.abs(importance[: n_models * n_classes]).reshape(n_models, n_classes).sum(axis=1)
    total = per_model.sum()
    return (per_model / total if total > 0 else np.full(n_models, 1.0 / n_models)).tolist()


def _fitted_models(meta: Any) -> list:
    """The fitted model(s) of a meta-model: ``model_``, or the per-label ``models_`` that are not
    constant rates."""
    return [meta.model_] if hasattr(meta, "model_") else fitted_models(meta.models_)


class NonNegativeLogReg(BaseEstimator):
    """A binary logistic pipeline whose coefficients are all >= 0 (an active set: columns that
    get a negative coefficient are dropped and the rest refitted until none is negative).

    Why: out-of-fold predictions of a model that knows nothing are still correlated with the
    labels by chance, and that correlation is shared by every fold (Jigsaw with shuffled labels:
    TF-IDF at 0.46 mean ROC-AUC in all five). A free coefficient turns such a model upside down
    and reports skill the nested CV cannot see through (0.517 mean over 5 shuffles); with
    coefficients >= 0 it is 0.506. A base model's belief in a label never counts against it,
    the constraint of Breiman's stacked regressions (1996).

    Parameters
    ----------
    make : () -> unfitted pipeline ending in a logistic model.
    """

    def __init__(self, make: Any):
        self.make = make

    def fit(self, X: np.ndarray, y: np.ndarray) -> NonNegativeLogReg:
        self.n_features_in_ = X.shape[1]
        columns = np.arange(X.shape[1])
        while True:
            pipeline = self.make().fit(X[:, columns], y)
            negative = pipeline[-1].coef_[0] < 0
            if not negative.any() or negative.all():
                break
            columns = columns[~negative]
        self.columns_, self.pipeline_ = columns, pipeline
        self.constant_ = float(y.mean()) if negative.all() else None  # nothing helps: the base rate
        return self

    @property
    def C_(self) -> float:
        last = self.pipeline_[-1]
        return float(last.C_ if hasattr(last, "C_") else last.C)

    @property
    def coef_(self) -> np.ndarray:
        """(1, n_features) on standardised inputs, 0 for the dropped columns."""
        coef = np.zeros((1, self.n_features_in_))
        if self.constant_ is None:
            coef[0, self.columns_] = self.pipeline_[-1].coef_[0]
        return coef

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.constant_ is not None:
            return np.column_stack([np.full(len(X), 1 - self.constant_), np.full(len(X), self.constant_)])
        return self.pipeline_.predict_proba(X[:, self.columns_])


class LogRegMeta(BaseEstimator):
    """Logistic regression on standardised base logits, C chosen by inner stratified CV.

    Single-label: one multinomial model on all M * C logits. Multilabel: one binary model
    per label, each seeing every model's logits for every label (labels are correlated:
    ``insult`` helps ``toxic``), with coefficients >= 0 (:class:`NonNegativeLogReg`).

    Parameters
    ----------
    inner_folds : folds of the inner CV that picks the regularisation strength.
    random_state : seed of the inner fold split.
    C : fixed strengths instead of the inner CV (one, or one per label): see :meth:`frozen`.
    """

    def __init__(self, inner_folds: int = 3, random_state: int = 42,
                 C: float | list[float] | None = None):
        self.inner_folds = inner_folds
        self.random_state = random_state
        self.C = C

    def _model(self, scoring: str, label: int = 0, cv: Any = None) -> Pipeline:
        """A fresh pipeline (the inner splits ``cv`` index rows, so they hold for any columns)."""
        if self.C is not None:
            C = self.C[label] if isinstance(self.C, list) else self.C
            return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
        return make_pipeline(StandardScaler(), LogisticRegressionCV(
            Cs=LOGREG_CS, l1_ratios=(0.0,), cv=cv, scoring=scoring, max_iter=1000,
            use_legacy_attributes=False))

    def _splits(self, X: StackInput, y: np.ndarray):
        return None if self.C is not None else X.inner_splits(y, self.inner_folds, self.random_state)

    def frozen(self) -> LogRegMeta:
        """Unfitted, with the strengths this fit chose: one plain fit each, no inner CV."""
        if hasattr(self, "model_"):
            return LogRegMeta(self.inner_folds, self.random_state, C=float(self.model_[-1].C_))
        chosen = [1.0 if isinstance(m, float) else m.C_ for m in self.models_]
        return LogRegMeta(self.inner_folds, self.random_state, C=chosen)

    def fit(self, X: StackInput, Y: np.ndarray, X_val: Any = None, Y_val: Any = None) -> LogRegMeta:
        features = X.flat_logits()
        self.n_models_, self.n_classes_ = X.n_models, X.n_classes
        # BLAS threads on a few dozen columns only fight over the cores (16x slower on 2 busy ones)
        with threadpool_limits(limits=1):
            if X.multilabel:
                def fit_label(j: int) -> NonNegativeLogReg:
                    splits = self._splits(X, Y[:, j])
                    return NonNegativeLogReg(partial(self._model, "roc_auc", j, splits)).fit(
                        features, Y[:, j])

                self.models_ = fit_per_label(Y, fit_label, _cross_validatable(self.inner_folds))
            else:
                y = Y.argmax(axis=1)
                self.model_ = self._model("neg_log_loss", cv=self._splits(X, y)).fit(features, y)
        return self

    def predict_proba(self, X: StackInput) -> np.ndarray:
        """(n, C) float32 probabilities."""
        features = X.flat_logits()
        if X.multilabel:
            return predict_per_label(self.models_, lambda m: m.predict_proba(features)[:, 1], len(X))
        proba = np.zeros((len(X), self.n_classes_), dtype=np.float32)
        proba[:, self.model_.classes_] = self.model_.predict_proba(features)  # absent classes stay 0
        return proba

    def summary(self) -> dict[str, Any]:
        """JSON-able: each base model's share of |coefficient| and the chosen C per model."""
        fitted = _fitted_models(self)
        if not fitted:
            return {"kind": "importance share",
                    "weights": [1.0 / self.n_models_] * self.n_models_, "C": []}
        final = [m if isinstance(m, NonNegativeLogReg) else m[-1] for m in fitted]
        importance = np.sum([np.abs(m.coef_).sum(axis=0) for m in final], axis=0)
        return {"kind": "importance share",
                "weights": _model_shares(importance, self.n_models_, self.n_classes_),
                "C": [float(m.C_ if hasattr(m, "C_") else m.C) for m in final]}


class LGBMMeta(BaseEstimator):
    """A small LightGBM on the base logits (+ optional meta features such as text lengths).

    The number of boosting rounds is found by ``lightgbm.cv`` with early stopping on
    inner folds of the training rows, then one model is refitted on all of them.
    Multilabel: one binary model per label (metric AUC), monotone increasing in every base
    logit; single-label: one multiclass model (metric log loss).

    Parameters
    ----------
    inner_folds : folds of the inner CV that picks the number of rounds.
    random_state : seed of LightGBM and of the inner fold split.
    rounds : fixed boosting rounds instead of the inner CV (one, or one per label): see
        :meth:`frozen`.
    """

    def __init__(self, inner_folds: int = 3, random_state: int = 42,
                 rounds: int | list[int] | None = None):
        self.inner_folds = inner_folds
        self.random_state = random_state
        self.rounds = rounds

    def frozen(self) -> LGBMMeta:
        """Unfitted, with the rounds this fit chose: one plain fit each, no inner CV."""
        if hasattr(self, "model_"):
            return LGBMMeta(self.inner_folds, self.random_state, rounds=self.model_.current_iteration())
        chosen = [0 if isinstance(m, float) else m.current_iteration() for m in self.models_]
        return LGBMMeta(self.inner_folds, self.random_state, rounds=chosen)

    @staticmethod
    def _features(X: StackInput) -> np.ndarray:
        logits = X.flat_logits()
        return logits if X.meta is None else np.hstack([logits, X.meta.astype(np.float64)])

    def _train(self, features: np.ndarray, y: np.ndarray, params: dict[str, Any],
               label: int = 0, splits: list | None = None) -> lgb.Booster:
        params = {**_LGBM_PARAMS, **params, "seed": self.random_state}
        y = np.ascontiguousarray(y)  # a label column of Y is a strided view LightGBM would copy
        if self.rounds is not None:
            rounds = self.rounds[label] if isinstance(self.rounds, list) else self.rounds
            return lgb.train(params, lgb.Dataset(features, y), num_boost_round=max(rounds, 1))
        history = lgb.cv(params, lgb.Dataset(features, y), num_boost_round=_LGBM_MAX_ROUNDS,
                         folds=splits, seed=self.random_state,
                         callbacks=[lgb.early_stopping(_LGBM_EARLY_STOP, verbose=False)])
        n_rounds = len(next(iter(history.values())))
        return lgb.train(params, lgb.Dataset(features, y), num_boost_round=n_rounds)

    def fit(self, X: StackInput, Y: np.ndarray, X_val: Any = None, Y_val: Any = None) -> LGBMMeta:
        features = self._features(X)
        self.n_models_, self.n_classes_ = X.n_models, X.n_classes
        if X.multilabel:
            # predictions rise with every base logit, never fall (see NonNegativeLogReg);
            # the meta features (text lengths) are free
            rising = [1] * (X.n_models * X.n_classes) + [0] * (features.shape[1] - X.n_models * X.n_classes)
            binary = {"objective": "binary", "metric": "auc", "monotone_constraints": rising}
            self.models_ = fit_per_label(
                Y, lambda j: self._train(features, Y[:, j], binary, j,
                                         X.inner_splits(Y[:, j], self.inner_folds, self.random_state)),
                _cross_validatable(self.inner_folds))
        else:
            multiclass = {"objective": "multiclass", "num_class": X.n_classes,
                          "metric": "multi_logloss"}
            y = Y.argmax(axis=1)
            self.model_ = self._train(features, y, multiclass,
                                      splits=X.inner_splits(y, self.inner_folds, self.random_state))
        return self

    def predict_proba(self, X: StackInput) -> np.ndarray:
        """(n, C) float32 probabilities."""
        features = self._features(X)
        if X.multilabel:
            return predict_per_label(self.models_, lambda m: m.predict(features), len(X))
        return self.model_.predict(features).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """JSON-able: each base model's share of split gain and the rounds per model."""
        boosters = _fitted_models(self)
        if not boosters:
            return {"kind": "importance share",
                    "weights": [1.0 / self.n_models_] * self.n_models_, "rounds": []}
        gain = np.sum([b.feature_importance("gain") for b in boosters], axis=0)
        return {"kind": "importance share",
                "weights": _model_shares(gain, self.n_models_, self.n_classes_),
                "rounds": [b.current_iteration() for b in boosters]}


class SelectModel(BaseEstimator):
    """Pass one base model through unchanged: the fallback when no stacker beats it.

    Parameters
    ----------
    index : which of the M base models to return.
    """

    def __init__(self, index: int = 0):
        self.index = index

    def fit(self, X: StackInput, Y: np.ndarray, X_val: Any = None, Y_val: Any = None) -> SelectModel:
        self.n_models_ = X.n_models
        return self

    def predict_proba(self, X: StackInput) -> np.ndarray:
        """(n, C) float32: the chosen model's probabilities."""
        return X.probs[:, self.index, :].astype(np.float32)

    def summary(self) -> dict[str, Any]:
        weights = np.zeros(self.n_models_)
        weights[self.index] = 1.0
        return {"kind": "blend weights", "weights": weights.tolist()}
