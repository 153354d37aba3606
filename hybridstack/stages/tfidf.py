"""Stage tfidf: word+char TF-IDF and logistic regression, cross-validated on the shared folds."""

from __future__ import annotations

import hashlib
import json
import logging

from hybridstack.config import Config, LogRegModel, NBSVMModel
from hybridstack.errors import HybridstackError
from hybridstack.experiment import Experiment
from hybridstack.features.tfidf import TfidfFeatures, TfidfFeaturizer, load_or_build_matrix
from hybridstack.heads.base import FoldStore, SwapView, fit_oof
from hybridstack.heads.logreg import LogRegHead
from hybridstack.heads.nbsvm import NBSVMHead
from hybridstack.runs import FEATURIZER_FILE, write_joblib
from hybridstack.stages.common import (
    save_model_outputs,
    skip_if_done,
    stage_experiment,
    stage_main,
    write_best_submission,
)

log = logging.getLogger(__name__)


# [tfidf] keys added after runs were made: hashed only when set, so those runs stay DONE
_HASHED_WHEN_SET = {"nbsvm": [], "shape_features": False}


def tfidf_settings(cfg: Config, exclude: set[str]) -> dict:
    """The [tfidf] section as hashed: later keys left out while at their defaults."""
    dumped = cfg.tfidf.model_dump(mode="json", exclude=exclude)
    return {k: v for k, v in dumped.items() if _HASHED_WHEN_SET.get(k, object()) != v}


def model_settings(cfg: Config, spec: LogRegModel | NBSVMModel) -> dict:
    """One model's own settings: the shared [tfidf] featurisation + its own list entry."""
    settings = {"model": spec.model_dump(mode="json"),
                "tfidf": tfidf_settings(cfg, {"models", "nbsvm"})}
    if isinstance(spec, NBSVMModel):
        settings["head"] = "NBSVMModel"  # logistic regressions keep the hash they had
        settings["solver"] = "liblinear_dual"  # models fitted by the primal solver are refitted
    return settings


def make_head(spec: LogRegModel | NBSVMModel, exp: Experiment):
    multilabel = exp.task.kind == "multilabel"
    if isinstance(spec, NBSVMModel):
        if exp.task.swap_fields is not None:
            raise HybridstackError(f"tfidf.nbsvm ({spec.name}) is for multilabel and multiclass "
                                   "tasks: the pairwise A - B features are signed; remove it")
        return NBSVMHead(multilabel=multilabel, C=spec.C, alpha=spec.alpha,
                         max_iter=spec.max_iter, random_state=exp.cfg.cv.seed)
    return LogRegHead(multilabel=multilabel, C=spec.C, class_weight=spec.class_weight,
                      max_iter=spec.max_iter, random_state=exp.cfg.cv.seed)


def model_config_hash(exp: Experiment, spec: LogRegModel | NBSVMModel) -> str:
    """Covers only this model's settings, so adding a second model never refits the first."""
    return exp.settings_hash(model_settings(exp.cfg, spec))


def hash_before_layout(exp: Experiment, spec: LogRegModel) -> str:
    """The DONE an older hybridstack wrote: the whole [tfidf] section (as it was then, without
    the later nbsvm list) + the model's name, in ``Experiment.stage_hash``'s recipe."""
    section = {"tfidf": tfidf_settings(exp.cfg, set())}
    section_hash = hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode())
    blob = exp.fingerprint + section_hash.hexdigest()[:16]
    return hashlib.sha256(blob.encode()).hexdigest()[:16] + spec.name


def swap_view(exp: Experiment, features: TfidfFeatures) -> SwapView | None:
    """Pairwise: the A/B-swapped rows, derived from the matrix by its column layout; caches
    written before that hold the swapped matrices themselves, and are used as they are."""
    if exp.task.swap_permutation is None:
        return None
    settings = {"augment": exp.cfg.tfidf.swap_augment, "tta": exp.cfg.tfidf.swap_tta}
    if features.X_swap is not None:
        return SwapView(features.X_swap, features.X_test_swap, exp.task.swap_permutation,
                        **settings)
    return SwapView(features.shape_swap, features.shape_test_swap, exp.task.swap_permutation,
                    columns=features.columns, **settings)


def run(exp: Experiment | Config) -> None:
    exp = stage_experiment(exp, "tfidf")
    if exp is None:
        return
    cfg = exp.cfg
    features = None
    for spec in [*cfg.tfidf.models, *cfg.tfidf.nbsvm]:
        model = exp.dir.model(spec.name)
        config_hash = model_config_hash(exp, spec)
        older = hash_before_layout(exp, spec) if isinstance(spec, LogRegModel) else None
        if skip_if_done(model, config_hash, older_hash=older):
            continue
        if features is None:
            features = load_or_build_matrix(exp)
        head = make_head(spec, exp)
        swap = swap_view(exp, features)
        result = fit_oof(head, features.X, exp.train.Y, exp.folds, features.X_test,
                         score=exp.task.score, swap=swap, store=FoldStore(model.path, config_hash))
        # the featurizer travels with the model, so predict can featurise new text alone
        write_joblib(model.path / FEATURIZER_FILE,
                     TfidfFeaturizer(features.vectorizer, exp.task.swap_fields,
                                     getattr(features, "shape_scale", None)))  # older caches lack it
        settings = {**model_settings(cfg, spec), "swap_tta": cfg.tfidf.swap_tta}
        save_model_outputs(exp, model, result, settings, config_hash, stage="tfidf")
    write_best_submission(exp)


if __name__ == "__main__":
    stage_main("tfidf", run)
