"""What every stage shares: saving a model's outputs, skip checks, the submission."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hybridstack.config import Config, load_config
from hybridstack.console import run_guarded, setup_logging
from hybridstack.errors import HybridstackError
from hybridstack.experiment import Experiment, load_snapshot, open_experiment
from hybridstack.heads.base import OOFResult
from hybridstack.runs import ModelDir, write_json, write_npy, write_text
from hybridstack.versions import library_versions

log = logging.getLogger(__name__)

def skip_if_done(model: ModelDir, config_hash: str, *, older_hash: str | None = None) -> bool:
    """True (and logs) when ``model`` is DONE for this exact config; else clears a stale DONE.

    ``older_hash``: what an older hybridstack wrote for the same settings. Such a DONE is
    kept as it is (the stack recorded it), so an upgrade neither refits nor breaks predict.
    """
    if model.is_done(config_hash) or (older_hash is not None and model.is_done(older_hash)):
        log.info("%s: DONE with the same config, skipped", model.name)
        return True
    model.clear_done()
    return False


def save_model_outputs(
    exp: Experiment,
    model: ModelDir,
    result: OOFResult,
    settings: dict[str, Any],
    config_hash: str,
    *,
    stage: str,
) -> dict[str, Any]:
    """Write oof.npy, test.npy, scores.json and config.json, then DONE (last).

    ``stage`` (tfidf, embed, finetune) goes into config.json so predict knows how to
    load the model folder.
    """
    covered = ~np.isnan(result.oof).any(axis=1)
    overall = exp.task.metrics(exp.train.Y[covered], result.oof[covered])
    scores = {
        "metric_name": exp.task.metric_name,
        "greater_is_better": exp.task.greater_is_better,
        "overall": overall["metric"],
        "extra": {k: v for k, v in overall.items() if k != "metric"},
        "per_fold": {str(k): v for k, v in result.fold_scores.items()},
        "fold_info": {str(k): v for k, v in result.fold_info.items()},
        "rows_validated": int(covered.sum()),
        "rows_basis": [model.name],  # the rows this model itself was validated on
        "seconds": round(result.seconds, 3),
    }
    write_npy(model.oof_path, result.oof.astype(np.float32))
    if result.test_pred is not None:
        write_npy(model.test_path, result.test_pred.astype(np.float32))
    write_json(model.scores_path, scores)
    write_json(model.config_path, {"stage": stage, "settings": settings, "versions": library_versions(),
                                   "label_names": exp.task.label_names})
    exp.snapshot_config()
    model.mark_done(config_hash)
    print(f"{model.name}: CV {exp.task.metric_name} = {scores['overall']:.5f} "
          f"({scores['rows_validated']} rows, {scores['seconds']:.1f}s)")
    return scores


def best_model(exp: Experiment) -> ModelDir | None:
    """The finished base model with the best overall CV score (that has test predictions)."""
    best, best_score = None, None
    for model in exp.dir.finished_models():
        if not model.test_path.is_file():
            continue
        score = model.load_scores()["overall"]
        if best_score is None or exp.task.is_better(score, best_score):
            best, best_score = model, score
    return best


def write_submission(exp: Experiment, test_pred: np.ndarray, source: str) -> None:
    """Validate and atomically write submission.csv in the sample's id and column order.

    With the config's ``submission`` path (Kaggle reads /kaggle/working/submission.csv),
    the same validated text is written there too.
    """
    if exp.test is None:
        return
    sub = exp.task.submission_frame(exp.test.ids, test_pred, exp.sample)
    exp.task.validate_submission(sub, exp.sample, exp.test.ids)
    text = sub.to_csv(index=False)
    targets = [exp.dir.submission_path, exp.cfg.submission]
    for path in filter(None, targets):
        write_text(path, text)
    print(f"submission ({source}) -> {' and '.join(str(p) for p in filter(None, targets))}")


def write_best_submission(exp: Experiment) -> None:
    """After a base stage: the submission from the best base model so far (the stacker overrides)."""
    if exp.test is None:
        print("no test file: cross-validation only, no submission written")
        return
    if exp.dir.stack.is_done():
        return  # the stacker's blend is the submission; a base stage never downgrades it
    best = best_model(exp)
    if best is not None:
        write_submission(exp, best.load_test(), f"best model so far: {best.name}")


def stage_experiment(exp_or_cfg: Experiment | Config, section: str) -> Experiment | None:
    """The experiment a stage runs on, or None (said once) when ``[section]`` is disabled.

    Stages run on an experiment the pipeline opened; a Config (scripts, tests) is opened
    here, and only when the stage is enabled.
    """
    cfg = exp_or_cfg if isinstance(exp_or_cfg, Config) else exp_or_cfg.cfg
    if not getattr(cfg, section).enabled:
        print(f"{section}: disabled in the config ({section}.enabled = false), skipped")
        return None
    return open_experiment(exp_or_cfg) if isinstance(exp_or_cfg, Config) else exp_or_cfg


def stage_main(stage: str, run) -> None:
    """``python -m hybridstack.stages.<stage> -c cfg.toml [--set k=v]`` entry point.

    ``--experiment SNAPSHOT`` instead of ``-c``: the experiment the pipeline opened (its
    worker processes of a data-parallel fine-tune start this way).
    """
    parser = argparse.ArgumentParser(prog=f"python -m hybridstack.stages.{stage}")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config")
    source.add_argument("--experiment", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    setup_logging()

    def go() -> None:
        if args.experiment:
            run(load_snapshot(Path(args.experiment)))
            return
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise HybridstackError(f"start a data-parallel {stage} with `hybridstack run {stage} "
                                   "-c cfg.toml --num-processes N`")
        run(open_experiment(load_config(args.config, args.set)))

    sys.exit(run_guarded(go))
