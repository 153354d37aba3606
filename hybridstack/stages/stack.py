"""Stage stack: blend the finished base models' OOF predictions into the submission.

Level 1 stacks the base models that cover every training row, on every row: each candidate
(every single model passed through, a weighted average, a logistic and a LightGBM
meta-model) is scored by nested CV on the experiment's folds, the best is chosen (a
stacker only if it beats every single model) and refitted on all rows. The score reported
is not the winner's nested score (the best of several estimates is optimistic) but that of
an outer loop in which each fold is predicted by the candidate chosen on inner folds of
the other rows. Models that cover only some folds (a fine-tune on fold 0) join at level 2,
on the rows they cover: a blend of level 1 with them, which must beat level 1 on those same
rows to write the submission. Reads only ``oof.npy``/``test.npy``; never re-runs a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone

from hybridstack.config import Config
from hybridstack.ensembles import make_stacker
from hybridstack.ensembles.inputs import StackInput, meta_features
from hybridstack.ensembles.meta import SelectModel
from hybridstack.ensembles.nested import (
    SINGLE_PREFIX,
    Choice,
    NestedResult,
    SelectionResult,
    choose,
    nested_oof,
    selected_oof,
)
from hybridstack.ensembles.thresholds import held_out_thresholds
from hybridstack.errors import HybridstackError
from hybridstack.experiment import Experiment
from hybridstack.folds import make_folds
from hybridstack.runs import (
    META_MODEL_FILE,
    THRESHOLDS_FILE,
    WEIGHTS_FILE,
    ExperimentDir,
    ModelDir,
    read_json,
    write_joblib,
    write_json,
    write_npy,
)
from hybridstack.stages.common import (
    skip_if_done,
    stage_experiment,
    stage_main,
    write_submission,
)
from hybridstack.versions import library_versions

log = logging.getLogger(__name__)

# A base model's recorded per-fold score must match its OOF rescored on this experiment's folds.
_FOLD_SCORE_TOLERANCE = 1e-4


@dataclass
class BaseModel:
    """One finished base model's outputs, checked against the experiment."""

    name: str
    done_hash: str
    oof: np.ndarray  # (n_train, C) float32, NaN rows never validated
    test: np.ndarray | None  # (n_test, C) float32


# -- choosing and checking the base models ---------------------------------------------------


def select_base_models(exp: Experiment) -> list[BaseModel]:
    """The finished base models to stack (all, or ``stack.models``), each validated."""
    finished = {m.name: m for m in exp.dir.finished_models()}
    wanted = exp.cfg.stack.models
    if wanted is None:
        names = sorted(finished)
    else:
        names = list(dict.fromkeys(wanted))
        finished.update({n: sibling_model(exp, n) for n in names if "/" in n})
        missing = [n for n in names if n not in finished]
        if missing:
            raise HybridstackError(
                f"stack.models: {', '.join(missing)} not finished in {exp.dir.models_dir} "
                f"(finished: {', '.join(sorted(finished)) or 'none'}); run its stage or fix the name")
    if not names:
        raise HybridstackError(
            f"stack: no finished base models in {exp.dir.models_dir}; run tfidf, embed or finetune first")
    return [load_base_model(exp, finished[n], n) for n in names]


def sibling_model(exp: Experiment, name: str) -> ModelDir:
    """``<experiment>/<model>`` from another experiment of this workdir (e.g. a sweep's best head).

    Only experiments on the same data with the same folds qualify: their OOF rows must
    line up row by row with this experiment's.
    """
    model = exp.dir.model(name)
    other = ExperimentDir(model.path.parent.parent)
    if not model.is_done():
        raise HybridstackError(f"stack.models: {name} is not finished ({model.path} has no DONE)")
    same_data = read_json(other.dataset_path).get("fingerprint") == exp.fingerprint
    if not (same_data and other.folds_path.is_file() and np.array_equal(np.load(other.folds_path), exp.folds)):
        raise HybridstackError(
            f"stack.models: {name} comes from an experiment with other data or folds than "
            f"{exp.dir.path.name}; only experiments of the same dataset and folds can be blended")
    return model


def load_base_model(exp: Experiment, model: ModelDir, name: str | None = None) -> BaseModel:
    """Load one model's outputs; refuse other columns, row counts or folds in one line."""
    name = name or model.name
    where = f"models/{name}"
    label_names = read_json(model.config_path).get("label_names") if model.config_path.is_file() else None
    if label_names != exp.task.label_names:
        raise HybridstackError(
            f"{where}: columns {label_names} differ from this experiment's {exp.task.label_names}; "
            "re-run its stage or leave it out with stack.models")
    shape = (len(exp.train), exp.task.n_classes)
    oof = model.load_oof()
    if oof.shape != shape:
        raise HybridstackError(
            f"{where}/oof.npy has shape {oof.shape} but this experiment needs {shape}; "
            "it was made from other data: re-run its stage")
    test = model.load_test()
    if exp.test is not None:
        test_shape = (len(exp.test), exp.task.n_classes)
        if test is None or test.shape != test_shape:
            got = "no test.npy" if test is None else f"test.npy of shape {test.shape}"
            raise HybridstackError(f"{where} has {got} but this experiment needs {test_shape}; "
                                   "re-run its stage")
    check_same_folds(exp, model, oof)
    done_hash = model.done_path.read_text().strip()
    return BaseModel(name, done_hash, oof.astype(np.float32), test)


def check_same_folds(exp: Experiment, model: ModelDir, oof: np.ndarray) -> None:
    """Refuse a model validated on other folds: its OOF rows of a fold would mix models.

    Two signs give it away: a fold that is only partly predicted (NaN rows follow the
    folds a model was trained on), and recorded per-fold scores that differ from the
    same OOF rescored on this experiment's folds.
    """
    covered = ~np.isnan(oof).any(axis=1)
    per_fold = model.load_scores().get("per_fold", {}) if model.scores_path.is_file() else {}
    for k in range(exp.n_splits):
        rows = exp.folds == k
        if covered[rows].any() and not covered[rows].all():
            raise _fold_error(model, f"fold {k} is only partly predicted")
        recorded = per_fold.get(str(k))
        if recorded is None or not covered[rows].all():
            continue
        rescored = exp.task.score(exp.train.Y[rows], oof[rows])
        if not np.isclose(rescored, recorded, rtol=_FOLD_SCORE_TOLERANCE, atol=_FOLD_SCORE_TOLERANCE):
            raise _fold_error(model, f"fold {k} scores {rescored:.5f} here but {recorded:.5f} in scores.json")
    unknown = sorted(set(per_fold) - {str(k) for k in range(exp.n_splits)})
    if unknown:
        raise _fold_error(model, f"scores.json names folds {unknown} this experiment does not have")


def _fold_error(model: ModelDir, detail: str) -> HybridstackError:
    return HybridstackError(
        f"models/{model.name} was validated on other folds than this experiment's folds.npy "
        f"({detail}); re-run its stage")


# Added to the hash when the same inputs of a task kind would give another stack, so that an
# older stack folder is refitted (and no other kind's): multilabel meta-models constrained to
# rise with every base logit.
STACKER_CHANGES = {"multilabel": "non-negative meta-models"}


def stack_config_hash(exp: Experiment, bases: list[BaseModel]) -> str:
    """The stack's DONE hash: data + [stack] settings + which base models, in which versions
    (+ the stackers' changes for this task kind)."""
    members = json.dumps([[b.name, b.done_hash] for b in bases])
    blob = exp.stage_hash("stack") + members + STACKER_CHANGES.get(exp.task.kind, "")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- folds and candidates ---------------------------------------------------------------------


def stacking_folds(exp: Experiment, covered: np.ndarray) -> tuple[np.ndarray, str]:
    """(n_train,) fold id for nested CV (-1 = excluded row) and how it was made.

    Normally the outer folds restricted to covered rows. When the covered rows lie in a
    single outer fold (every chosen model was validated there, e.g. a fine-tune on fold 0
    only), those rows are re-split: all their OOF predictions are still held-out ones.
    """
    fold_id = np.where(covered, exp.folds, -1).astype(np.int64)
    if len(np.unique(fold_id[covered])) >= 2:
        return fold_id, "outer folds"
    rows = np.flatnonzero(covered)
    fold_id[rows] = split_rows(exp, rows, exp.cfg.cv.n_splits)
    return fold_id, "covered rows lie in one outer fold: re-split into cv.n_splits folds"


def split_rows(exp: Experiment, rows: np.ndarray, n_splits: int) -> np.ndarray:
    """Fold ids for ``rows``, grouped (pairwise: by prompt) and stratified like the folds."""
    groups = None if exp.train.groups is None else exp.train.groups[rows]
    return make_folds(exp.task.stratify_target(exp.train.Y[rows]), n_splits, exp.cfg.cv.seed,
                      groups)


def candidate_stackers(cfg: Config, n_models: int, methods: list[str] | None = None) -> dict[str, Any]:
    """Each configured stacker (or ``methods``) when there are >= 2 models."""
    candidates: dict[str, Any] = {}
    if n_models >= 2:
        for method in cfg.stack.methods if methods is None else methods:
            candidates[method] = make_stacker(method, temperature=cfg.stack.temperature,
                                              inner_folds=cfg.stack.inner_folds,
                                              random_state=cfg.cv.seed)
    return candidates


@dataclass
class Level:
    """One stacking level: its models, the rows it was validated on and what it chose.

    ``results`` are each candidate's nested-CV scores (the choice among them made on the
    same rows, so the best of them is optimistic); ``selected`` is the honest score of the
    whole procedure, the choice made inside each outer fold.
    """

    names: list[str]
    rows: np.ndarray  # (n_train,) bool
    fold_id: np.ndarray
    fold_source: str
    results: dict[str, NestedResult]
    choice: Choice
    selected: SelectionResult
    final: Any  # the chosen candidate refitted on every row of the level
    test_pred: np.ndarray | None


def fit_level(exp: Experiment, names: list[str], X: StackInput, X_test: StackInput | None,
              rows: np.ndarray, label: str, methods: list[str] | None = None) -> Level:
    """Score every candidate on ``rows``, choose one, score the choice honestly, refit it.

    Candidates: every single model passed through, and the stackers of ``methods``
    (default ``stack.methods``)."""
    fold_id, fold_source = stacking_folds(exp, rows)
    stackers = {f"{SINGLE_PREFIX}{n}": SelectModel(index=i) for i, n in enumerate(names)}
    stackers.update(candidate_stackers(exp.cfg, len(names), methods))
    results = {}
    for name, stacker in stackers.items():
        results[name] = nested_oof(stacker, X, exp.train.Y, fold_id, exp.task.score)
        print(f"stack {label}: {name}: nested {exp.task.metric_name} = {results[name].overall:.5f} "
              f"({results[name].seconds:.1f}s)", flush=True)
    choice = choose(results, exp.task.greater_is_better)
    selected = selected_oof(results, X, exp.train.Y, fold_id, exp.task.score,
                            exp.task.greater_is_better,
                            lambda r: split_rows(exp, r, exp.cfg.stack.inner_folds))
    print(f"stack {label}: chose {choice.name}: {choice.note}; with the choice inside the "
          f"nest: {exp.task.metric_name} = {selected.overall:.5f} over {int(rows.sum())} rows "
          f"({selected.seconds:.1f}s)", flush=True)
    final = clone(stackers[choice.name]).fit(X[np.flatnonzero(rows)], exp.train.Y[rows])
    test_pred = None if X_test is None else final.predict_proba(X_test)
    return Level(names, rows, fold_id, fold_source, results, choice, selected, final, test_pred)


def covers_every_row(model: BaseModel) -> bool:
    return not np.isnan(model.oof).any()


def stack_levels(exp: Experiment, bases: list[BaseModel]) -> tuple[Level, Level | None]:
    """Level 1 stacks the models that cover every row, on every row. Models covering only
    some folds (a fine-tune on fold 0) join at level 2, on the rows they cover, as a blend
    of level 1 and them (a weight and a temperature), which must beat level 1 there.

    Without any full-coverage model, level 1 is every model on the rows all of them cover.
    """
    full = [b for b in bases if covers_every_row(b)] or bases
    partial = [b for b in bases if b not in full]
    X, X_test = build_inputs(exp, full)
    rows = X.covered_rows()
    if not rows.any():
        raise HybridstackError(
            "stack: no train row is predicted by every chosen base model; choose models that "
            "share validated folds with stack.models")
    level1 = fit_level(exp, [b.name for b in full], X, X_test, rows, "level 1")
    if not partial:
        return level1, None
    X2 = stack_input([level1.selected.oof] + [b.oof for b in partial], exp.task.kind,
                     exp.train.groups)
    X2_test = None if X_test is None else stack_input(
        [level1.test_pred] + [b.test for b in partial], exp.task.kind)
    rows2 = level1.rows & X2.covered_rows()
    if not rows2.any():
        raise HybridstackError(
            f"stack: no train row is predicted by every chosen base model ({', '.join(b.name for b in partial)} "
            "share no validated row); choose models that share validated folds with stack.models")
    names2 = [LEVEL1] + [b.name for b in partial]
    # few parameters on few rows: a weight per model and a temperature, no meta-model
    level2 = fit_level(exp, names2, X2, X2_test, rows2, "level 2", methods=["weighted"])
    return level1, level2


LEVEL1 = "level1"  # level 2's name for level 1's blend


def stack_input(probs: list[np.ndarray], kind: str, groups: np.ndarray | None = None) -> StackInput:
    return StackInput(np.stack(probs, axis=1), None, kind == "multilabel", groups)


# -- the stage ------------------------------------------------------------------------------


def build_inputs(exp: Experiment, bases: list[BaseModel]) -> tuple[StackInput, StackInput | None]:
    """Train and test StackInputs (test is None without a test file)."""
    multilabel = exp.task.kind == "multilabel"
    use_meta = exp.cfg.stack.meta_features
    # the meta-models' inner CV keeps a prompt's rows together, as the folds do
    train = StackInput(np.stack([b.oof for b in bases], axis=1),
                       meta_features(exp.train.fields) if use_meta else None, multilabel,
                       exp.train.groups)
    if exp.test is None:
        return train, None
    test = StackInput(np.stack([b.test for b in bases], axis=1),
                      meta_features(exp.test.fields) if use_meta else None, multilabel)
    return train, test


def run(exp: Experiment | Config) -> None:
    exp = stage_experiment(exp, "stack")
    if exp is None:
        return
    bases = select_base_models(exp)
    stack = exp.dir.stack
    config_hash = stack_config_hash(exp, bases)
    if skip_if_done(stack, config_hash):
        return
    started = time.perf_counter()
    level1, level2 = stack_levels(exp, bases)
    print(f"stack: {len(bases)} base models ({', '.join(b.name for b in bases)}); level 1: "
          f"{', '.join(level1.names)} on {int(level1.rows.sum())} rows"
          + ("" if level2 is None else f"; level 2: {', '.join(level2.names[1:])} on "
                                       f"{int(level2.rows.sum())} rows"), flush=True)
    if level2 is not None and level2.choice.name == f"{SINGLE_PREFIX}{LEVEL1}":
        print("stack: level 2 does not beat level 1 on the rows it covers: level 1 is kept",
              flush=True)
    save_stack(exp, bases, level1, level2, time.perf_counter() - started, config_hash)


def level_scores(exp: Experiment, level: Level) -> dict[str, Any]:
    """A level's honest score and the per-candidate table, each saying over which rows."""
    rows = int(level.rows.sum())
    return {
        "overall": level.selected.overall,
        "per_fold": {str(k): v for k, v in level.selected.fold_scores.items()},
        "chosen_per_fold": {str(k): v for k, v in level.selected.chosen.items()},
        "rows_validated": rows,
        "chosen": level.choice.name,
        "note": level.choice.note,
        "stacking_folds": level.fold_source,
        # chosen on the same rows they are scored on: the best of them is optimistic
        "candidates": {name: {"overall": r.overall, "rows_validated": rows,
                              "per_fold": {str(k): v for k, v in r.fold_scores.items()},
                              "seconds": round(r.seconds, 3)} for name, r in level.results.items()},
        "models": level.names,
    }


def save_stack(exp: Experiment, bases: list[BaseModel], level1: Level, level2: Level | None,
               seconds: float, config_hash: str) -> None:
    """Write the stack folder (DONE last) and the submission."""
    stack = exp.dir.stack
    by_name = {b.name: b for b in bases}
    wins = level2 is not None and level2.choice.name != f"{SINGLE_PREFIX}{LEVEL1}"
    top = level2 if wins else level1
    oof = top.selected.oof
    used = ~np.isnan(oof).any(axis=1)
    metrics = exp.task.metrics(exp.train.Y[used], oof[used])
    # the rows a score is over: those every model of the level (and below) was validated on
    basis = [n for n in top.names if n != LEVEL1] if wins else level1.names
    scores = {
        "metric_name": exp.task.metric_name,
        "greater_is_better": exp.task.greater_is_better,
        **level_scores(exp, top),
        "extra": {k: v for k, v in metrics.items() if k != "metric"},
        "rows_basis": basis,
        "rows_excluded": int((~used).sum()),
        "level": 2 if wins else 1,
        "levels": {"1": level_scores(exp, level1),
                   **({} if level2 is None else {"2": level_scores(exp, level2)})},
        "selection": "each outer fold predicted by the candidate chosen on inner folds of the "
                     "other rows (stack.inner_folds)",
        "seconds": round(seconds, 3),
    }
    summary = level1.final.summary()
    weights = {"method": level1.choice.name, "models": level1.names, **summary,
               "weights": dict(zip(level1.names, summary["weights"]))}
    if wins:
        summary2 = level2.final.summary()
        weights["level2"] = {"method": level2.choice.name, "models": level2.names, **summary2,
                             "weights": dict(zip(level2.names, summary2["weights"]))}
    test_pred = top.test_pred
    write_npy(stack.oof_path, oof)
    if test_pred is not None:
        write_npy(stack.test_path, test_pred)
    write_json(stack.path / WEIGHTS_FILE, weights)
    write_joblib(stack.path / META_MODEL_FILE, {
        "stacker": level1.final, "models": [b.name for b in bases],
        "level1_models": level1.names,
        "level2": {"stacker": level2.final, "models": level2.names[1:]} if wins else None,
        "label_names": exp.task.label_names, "multilabel": exp.task.kind == "multilabel",
        "meta_features": exp.cfg.stack.meta_features})
    if exp.task.kind == "multilabel":
        write_json(stack.path / THRESHOLDS_FILE, held_out_thresholds(
            exp.train.Y, np.nan_to_num(oof), np.where(used, top.fold_id, -1),
            exp.task.label_names))
    write_json(stack.scores_path, scores)
    write_json(stack.config_path, {
        "settings": {"stack": exp.cfg.stack.model_dump(mode="json"),
                     "base_models": {b.name: by_name[b.name].done_hash for b in bases}},
        "versions": library_versions(), "label_names": exp.task.label_names})
    if test_pred is not None:
        write_submission(exp, test_pred, f"stack level {scores['level']}: {top.choice.name}")
    exp.snapshot_config()
    stack.mark_done(config_hash)
    print(f"stack: level {scores['level']} wrote the submission; CV {exp.task.metric_name} = "
          f"{scores['overall']:.5f} over {scores['rows_validated']} rows (choice inside the "
          f"nest; rows of {', '.join(basis)}), {seconds:.1f}s")


if __name__ == "__main__":
    stage_main("stack", run)
