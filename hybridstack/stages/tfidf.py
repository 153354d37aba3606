"""Stage tfidf: word+char TF-IDF and logistic regression, cross-validated on the shared folds."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import joblib

from hybridstack.config import Config
from hybridstack.experiment import Experiment, open_experiment
from hybridstack.features.tfidf import TfidfFeatures, build_tfidf
from hybridstack.heads.base import FoldStore, SwapView, fit_oof
from hybridstack.heads.logreg import LogRegHead
from hybridstack.runs import write_joblib
from hybridstack.stages.common import (
    require_enabled,
    save_model_outputs,
    skip_if_done,
    stage_main,
    write_best_submission,
)

log = logging.getLogger(__name__)

# Vectorizer settings: changing any of them invalidates the cached matrix; LR settings do not.
_MATRIX_KEYS = ("word_ngrams", "char_ngrams", "max_word_features", "max_char_features",
                "min_df", "sublinear_tf")


def matrix_cache_path(exp: Experiment):
    params = {k: getattr(exp.cfg.tfidf, k) for k in _MATRIX_KEYS}
    key = hashlib.sha256((exp.fingerprint + json.dumps(params, default=str)).encode()).hexdigest()
    return exp.dir.features_dir / f"tfidf_{key[:16]}.joblib"


def load_or_build_matrix(exp: Experiment) -> TfidfFeatures:
    """The TF-IDF matrices of this experiment, fitted once and cached in features/."""
    path = matrix_cache_path(exp)
    if path.is_file():
        started = time.perf_counter()
        features = joblib.load(path)
        log.info("tfidf: reused cached matrix %s (%.1fs)", path.name, time.perf_counter() - started)
        return features
    started = time.perf_counter()
    features = build_tfidf(
        exp.cfg.tfidf, exp.train.fields,
        exp.test.fields if exp.test is not None else None,
        exp.task.swap_fields,
    )
    write_joblib(path, features)
    log.info("tfidf: fitted %d features in %.1fs -> %s",
             features.X.shape[1], time.perf_counter() - started, path.name)
    return features


def run(cfg: Config) -> None:
    if not require_enabled(cfg, "tfidf"):
        return
    exp = open_experiment(cfg)
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
        # the vectorizer travels with the model so predict can featurise new text
        write_joblib(model.path / "vectorizer.joblib", features.vectorizer)
        settings = {"model": spec.model_dump(), "tfidf": cfg.tfidf.model_dump(mode="json",
                                                                              exclude={"models"})}
        save_model_outputs(exp, model, result, settings, config_hash, stage="tfidf")
    write_best_submission(exp)


if __name__ == "__main__":
    stage_main("tfidf", run)
