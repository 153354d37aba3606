"""Stage tfidf: word+char TF-IDF and logistic regression, cross-validated on the shared folds."""

from __future__ import annotations

import logging

from hybridstack.config import Config
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

def run(exp: Experiment | Config) -> None:
    exp = stage_experiment(exp, "tfidf")
    if exp is None:
        return
    cfg = exp.cfg
    features = None
    for spec in cfg.tfidf.models:
        model = exp.dir.model(spec.name)
        config_hash = exp.stage_hash("tfidf") + spec.name
        if skip_if_done(model, config_hash):
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
        settings = {"model": spec.model_dump(), "tfidf": cfg.tfidf.model_dump(mode="json",
                                                                              exclude={"models"}),
                    "swap_tta": cfg.tfidf.swap_tta}
        save_model_outputs(exp, model, result, settings, config_hash, stage="tfidf")
    write_best_submission(exp)


if __name__ == "__main__":
    stage_main("tfidf", run)
