"""Stage tfidf: word+char TF-IDF and logistic regression, cross-validated on the shared folds."""

from __future__ import annotations

import logging

from hybridstack.config import Config, LogRegModel
from hybridstack.experiment import Experiment
from hybridstack.features.tfidf import TfidfFeaturizer, load_or_build_matrix
from hybridstack.heads.base import FoldStore, SwapView, fit_oof
from hybridstack.heads.logreg import LogRegHead
from hybridstack.runs import FEATURIZER_FILE, write_joblib
from hybridstack.stages.common import (
    save_model_outputs,
    skip_if_done,
    stage_experiment,
    stage_main,
    write_best_submission,
)

log = logging.getLogger(__name__)


def model_settings(cfg: Config, spec: LogRegModel) -> dict:
    """One model's own settings: the shared [tfidf] featurisation + its [[tfidf.models]] entry."""
    return {"model": spec.model_dump(mode="json"),
            "tfidf": cfg.tfidf.model_dump(mode="json", exclude={"models"})}


def model_config_hash(exp: Experiment, spec: LogRegModel) -> str:
    """Covers only this model's settings, so adding a second model never refits the first."""
    return exp.settings_hash(model_settings(exp.cfg, spec))


def hash_before_layout(exp: Experiment, spec: LogRegModel) -> str:
    """The DONE an older hybridstack wrote: the whole [tfidf] section + the model's name."""
    return exp.stage_hash("tfidf") + spec.name


def run(exp: Experiment | Config) -> None:
    exp = stage_experiment(exp, "tfidf")
    if exp is None:
        return
    cfg = exp.cfg
    features = None
    for spec in cfg.tfidf.models:
        model = exp.dir.model(spec.name)
        config_hash = model_config_hash(exp, spec)
        if skip_if_done(model, config_hash, older_hash=hash_before_layout(exp, spec)):
            continue
        if features is None:
            features = load_or_build_matrix(exp)
        head = LogRegHead(multilabel=exp.task.kind == "multilabel", C=spec.C,
                          class_weight=spec.class_weight, max_iter=spec.max_iter,
                          random_state=cfg.cv.seed)
        swap = None
        if exp.task.swap_permutation is not None:
            swap = SwapView(features.X_swap, features.X_test_swap, exp.task.swap_permutation,
                            augment=cfg.tfidf.swap_augment, tta=cfg.tfidf.swap_tta)
        result = fit_oof(head, features.X, exp.train.Y, exp.folds, features.X_test,
                         score=exp.task.score, swap=swap, store=FoldStore(model.path, config_hash))
        # the featurizer travels with the model, so predict can featurise new text alone
        write_joblib(model.path / FEATURIZER_FILE,
                     TfidfFeaturizer(features.vectorizer, exp.task.swap_fields))
        settings = {**model_settings(cfg, spec), "swap_tta": cfg.tfidf.swap_tta}
        save_model_outputs(exp, model, result, settings, config_hash, stage="tfidf")
    write_best_submission(exp)


if __name__ == "__main__":
    stage_main("tfidf", run)
