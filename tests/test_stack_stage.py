"""The stack stage end to end on tiny synthetic competitions with two TF-IDF base models."""

from __future__ import annotations

import json

import joblib
import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from hybridstack.commands.report import write_report
from hybridstack.ensembles.levels import predict_levels
from hybridstack.errors import HybridstackError
from hybridstack.experiment import open_experiment
from hybridstack.runs import ExperimentDir, write_json, write_npy
from hybridstack.stages import stack, tfidf

TWO_MODELS = {"models": [{"name": "a", "C": 4.0}, {"name": "b", "C": 0.5}]}
FAST_STACK = {"enabled": True, "methods": ["weighted", "logreg"]}


@pytest.fixture
def stacked(make_config):
    """``stacked(kind, stack=..., **sections)`` -> (cfg, ExperimentDir) after tfidf with models a, b."""

    def factory(kind: str = "multilabel", stack_section: dict | None = None, n_train: int = 150):
        cfg, _ = make_config(kind, n_train=n_train, tfidf=TWO_MODELS,
                             stack={**FAST_STACK, **(stack_section or {})})
        tfidf.run(cfg)
        return cfg, ExperimentDir(cfg.run_dir)

    return factory


def fake_model(exp_dir: ExperimentDir, name: str, oof: np.ndarray, test: np.ndarray,
               label_names: list[str], per_fold: dict | None = None) -> None:
    """A finished base model folder written directly (as another stage would)."""
    model = exp_dir.model(name)
    write_npy(model.oof_path, oof.astype(np.float32))
    write_npy(model.test_path, test.astype(np.float32))
    write_json(model.scores_path, {"overall": 0.0, "per_fold": per_fold or {}, "seconds": 1.0,
                                   "metric_name": "m", "greater_is_better": True})
    write_json(model.config_path, {"settings": {}, "label_names": label_names})
    model.mark_done(f"fake-{name}")


def copy_of(exp_dir: ExperimentDir, source: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    model = exp_dir.model(source)
    return model.load_oof(), model.load_test(), json.loads(model.config_path.read_text())["label_names"]


def test_stack_writes_every_file_and_a_valid_submission(stacked):
    cfg, exp_dir = stacked("multilabel", {"methods": ["weighted", "logreg", "lgbm"]})
    stack.run(cfg)
    folder = exp_dir.stack
    for name in ("oof.npy", "test.npy", "scores.json", "config.json", "weights.json",
                 "meta_model.joblib", "thresholds.json", "DONE"):
        assert (folder.path / name).is_file(), name
    scores = folder.load_scores()
    assert set(scores["candidates"]) == {"single:a", "single:b", "weighted", "logreg", "lgbm"}
    # the reported score is the outer loop's, each fold predicted by the candidate chosen
    # on inner folds without it: the choice is inside the nest
    exp = open_experiment(cfg)
    assert scores["overall"] == pytest.approx(exp.task.score(exp.train.Y, folder.load_oof()))
    assert set(scores["chosen_per_fold"]) == {str(k) for k in range(cfg.cv.n_splits)}
    assert set(scores["chosen_per_fold"].values()) <= set(scores["candidates"])
    assert scores["rows_excluded"] == 0 and scores["rows_validated"] == 150
    assert scores["rows_basis"] == ["a", "b"] and scores["level"] == 1
    assert folder.load_oof().shape == (150, 6) and folder.load_test().shape == (40, 6)

    weights = json.loads((folder.path / "weights.json").read_text())
    assert set(weights["weights"]) == {"a", "b"}
    assert sum(weights["weights"].values()) == pytest.approx(1.0)
    assert min(weights["weights"].values()) >= 0
    thresholds = json.loads((folder.path / "thresholds.json").read_text())
    assert set(thresholds) == set(cfg.task.label_columns)
    assert all(0 <= t["f1"] <= 1 for t in thresholds.values())

    sub = pd.read_csv(exp_dir.submission_path, dtype={"id": str})
    exp.task.validate_submission(sub, exp.sample, exp.test.ids)
    assert list(sub.columns) == list(exp.sample.columns)
    expected = folder.load_test()[pd.Index(exp.test.ids).get_indexer(sub["id"])]
    np.testing.assert_allclose(sub[exp.task.label_names].to_numpy(), expected, rtol=1e-6)


def test_pairwise_stack_submission_rows_sum_to_one(make_config):
    cfg, _ = make_config("pairwise", stack=FAST_STACK)
    exp = open_experiment(cfg)
    exp_dir, rng = exp.dir, np.random.default_rng(0)
    for name, signal in (("sharp", 3.0), ("blunt", 1.0)):  # base models written directly: fast
        logits = signal * exp.train.Y + rng.normal(size=exp.train.Y.shape)
        test_logits = rng.normal(size=(len(exp.test), 3))
        fake_model(exp_dir, name, softmax(logits, axis=1), softmax(test_logits, axis=1),
                   exp.task.label_names)
    stack.run(cfg)
    sub = pd.read_csv(exp_dir.submission_path, dtype={"id": str})
    exp.task.validate_submission(sub, exp.sample, exp.test.ids)
    np.testing.assert_allclose(sub[exp.task.label_names].sum(axis=1), 1.0, atol=1e-4)


def test_skipped_when_done_and_rerun_when_the_base_models_change(stacked, capsys):
    cfg, exp_dir = stacked("multiclass")
    stack.run(cfg)
    first = exp_dir.stack.done_path.read_text()
    capsys.readouterr()
    stack.run(cfg)
    assert "nested" not in capsys.readouterr().out  # skipped: nothing recomputed
    oof, test, labels = copy_of(exp_dir, "a")
    fake_model(exp_dir, "c", oof, test, labels)
    stack.run(cfg)
    assert "single:c" in exp_dir.stack.load_scores()["candidates"]
    assert exp_dir.stack.done_path.read_text() != first


def test_a_partial_model_joins_at_level_2_without_shrinking_level_1(stacked):
    cfg, exp_dir = stacked("multilabel")
    folds = np.load(exp_dir.folds_path)
    oof, test, labels = copy_of(exp_dir, "b")
    oof[folds == 2] = np.nan  # e.g. a fine-tune trained on folds 0 and 1 only
    fake_model(exp_dir, "partial", oof, test, labels)
    stack.run(cfg)
    scores = exp_dir.stack.load_scores()
    level1, level2 = scores["levels"]["1"], scores["levels"]["2"]
    assert level1["rows_validated"] == 150 and level1["models"] == ["a", "b"]
    assert level2["rows_validated"] == int((folds != 2).sum())
    assert level2["models"] == ["level1", "partial"] and level2["stacking_folds"] == "outer folds"
    # whichever level wrote the submission, its score says over which rows
    expected = level2 if scores["level"] == 2 else level1
    assert scores["rows_validated"] == expected["rows_validated"]
    assert scores["rows_basis"] == (["partial"] if scores["level"] == 2 else ["a", "b"])
    stacked_oof = exp_dir.stack.load_oof()
    assert (~np.isnan(stacked_oof).any(axis=1)).sum() == scores["rows_validated"]


def test_a_model_covering_fold_0_only_does_not_reduce_the_full_coverage_rows(stacked):
    cfg, exp_dir = stacked("multilabel")
    folds = np.load(exp_dir.folds_path)
    oof, test, labels = copy_of(exp_dir, "b")
    oof[folds != 0] = np.nan  # a fine-tune validated on fold 0 only
    fake_model(exp_dir, "fold0", oof, test, labels)
    stack.run(cfg)
    scores = exp_dir.stack.load_scores()
    assert scores["levels"]["1"]["rows_validated"] == 150  # all rows, not fold 0's 30
    level2 = scores["levels"]["2"]
    assert level2["rows_validated"] == int((folds == 0).sum())
    assert level2["stacking_folds"].startswith("covered rows lie in one outer fold")
    assert len(level2["per_fold"]) == cfg.cv.n_splits
    # the fallback to level 1 is compared on level 2's rows: both candidates there
    assert {"single:level1", "single:fold0", "weighted"} <= set(level2["candidates"])
    assert "logreg" not in level2["candidates"]  # few parameters on few rows: no meta-model


def test_single_base_model_falls_back_to_it(stacked):
    cfg, exp_dir = stacked("multilabel", {"models": ["a"]})
    stack.run(cfg)
    scores = exp_dir.stack.load_scores()
    assert scores["chosen"] == "single:a" and "only one base model" in scores["note"]
    np.testing.assert_array_equal(exp_dir.stack.load_test(), exp_dir.model("a").load_test())
    assert scores["overall"] == pytest.approx(exp_dir.model("a").load_scores()["overall"])


def test_stacker_that_does_not_beat_the_best_model_falls_back(stacked):
    # a blend of a model with its own copy equals that model: AUC ties, so no stacker wins
    cfg, exp_dir = stacked("multilabel", {"models": ["a", "a_copy"], "methods": ["weighted"]})
    fake_model(exp_dir, "a_copy", *copy_of(exp_dir, "a"))
    stack.run(cfg)
    scores = exp_dir.stack.load_scores()
    assert scores["chosen"] in ("single:a", "single:a_copy")
    assert "falling back" in scores["note"]
    np.testing.assert_array_equal(exp_dir.stack.load_test(), exp_dir.model("a").load_test())


def _one_line_error(cfg, match: str) -> None:
    with pytest.raises(HybridstackError, match=match) as err:
        stack.run(cfg)
    assert "\n" not in str(err.value)
    assert not (cfg.run_dir / "stack" / "DONE").exists()


def test_refuses_a_model_with_other_row_counts(stacked):
    cfg, exp_dir = stacked("multilabel")
    oof, test, labels = copy_of(exp_dir, "a")
    fake_model(exp_dir, "short", oof[:-5], test, labels)
    _one_line_error(cfg, r"models/short/oof.npy has shape \(145, 6\)")


def test_refuses_a_model_with_other_label_columns(stacked):
    cfg, exp_dir = stacked("multilabel")
    oof, test, labels = copy_of(exp_dir, "a")
    fake_model(exp_dir, "renamed", oof, test, labels[::-1])
    _one_line_error(cfg, "models/renamed: columns .* differ")


def test_refuses_a_model_validated_on_other_folds(stacked):
    cfg, exp_dir = stacked("multilabel")
    oof, test, labels = copy_of(exp_dir, "a")
    # per-fold scores recorded under another fold assignment do not match these folds
    per_fold = {str(k): v + 0.01 for k, v in exp_dir.model("a").load_scores()["per_fold"].items()}
    fake_model(exp_dir, "other_folds", oof, test, labels, per_fold)
    _one_line_error(cfg, "models/other_folds was validated on other folds")


def test_refuses_a_model_with_a_partly_predicted_fold(stacked):
    cfg, exp_dir = stacked("multilabel")
    oof, test, labels = copy_of(exp_dir, "a")
    oof[:7] = np.nan  # NaN rows that do not follow this experiment's folds
    fake_model(exp_dir, "ragged", oof, test, labels)
    _one_line_error(cfg, "ragged was validated on other folds .*partly predicted")


def test_refuses_unknown_model_names(stacked):
    cfg, _ = stacked("multilabel", {"models": ["a", "nope"]})
    _one_line_error(cfg, "stack.models: nope not finished")


def test_disabled_stage_writes_nothing(make_config, capsys):
    cfg, _ = make_config("multiclass", stack={"enabled": False})
    stack.run(cfg)
    assert "disabled" in capsys.readouterr().out
    assert not (cfg.run_dir / "stack").exists()


def test_meta_features_reach_the_lgbm_stacker(stacked):
    cfg, exp_dir = stacked("multilabel", {"methods": ["lgbm"], "meta_features": True})
    stack.run(cfg)
    assert "lgbm" in exp_dir.stack.load_scores()["candidates"]
    saved = joblib.load(exp_dir.stack.path / "meta_model.joblib")
    assert saved["meta_features"] and saved["models"] == ["a", "b"]
    lgbm = stack.make_stacker("lgbm").fit(*_lgbm_inputs(cfg, exp_dir))
    boosters = [m for m in lgbm.models_ if not isinstance(m, float)]
    assert boosters[0].num_feature() == 2 * 6 + 6  # 2 models x 6 labels + 6 length counts


def _lgbm_inputs(cfg, exp_dir):
    exp = open_experiment(cfg)
    bases = stack.select_base_models(exp)
    X, _ = stack.build_inputs(exp, bases)
    return X, exp.train.Y


def test_refuses_models_without_a_shared_validated_row(stacked):
    cfg, exp_dir = stacked("multilabel")
    folds = np.load(exp_dir.folds_path)
    for name, fold in (("only0", 0), ("only1", 1)):
        oof, test, labels = copy_of(exp_dir, "a")
        oof[folds != fold] = np.nan
        fake_model(exp_dir, name, oof, test, labels)
    _one_line_error(cfg, "no train row is predicted by every chosen base model")


def test_a_strong_fold_0_model_wins_level_2_and_predict_reproduces_it(stacked):
    cfg, exp_dir = stacked("multilabel")
    exp = open_experiment(cfg)
    folds = np.load(exp_dir.folds_path)
    rng = np.random.default_rng(3)
    oof = np.where(folds[:, None] == 0, 0.1 + 0.8 * exp.train.Y, np.nan)  # near-perfect on fold 0
    test = rng.uniform(size=(len(exp.test), 6))
    fake_model(exp_dir, "sharp", oof, test, exp.task.label_names)
    stack.run(cfg)
    scores = exp_dir.stack.load_scores()
    assert scores["level"] == 2 and scores["chosen"] != "single:level1"
    assert scores["rows_validated"] == int((folds == 0).sum()) and scores["rows_basis"] == ["sharp"]
    saved = joblib.load(exp_dir.stack.path / "meta_model.joblib")
    assert saved["level1_models"] == ["a", "b"] and saved["level2"]["models"] == ["sharp"]
    preds = {name: exp_dir.model(name).load_test() for name in ("a", "b", "sharp")}
    np.testing.assert_allclose(predict_levels(saved, preds, None), exp_dir.stack.load_test(),
                               atol=1e-6)
    sub = pd.read_csv(exp_dir.submission_path, dtype={"id": str}).set_index("id")
    np.testing.assert_allclose(sub.loc[exp.test.ids, exp.task.label_names].to_numpy(),
                               exp_dir.stack.load_test(), rtol=1e-5)
    # the report compares every model over the stack's fold-0 rows, not over its own rows
    report = write_report(cfg.run_dir).read_text()
    fold0 = folds == 0
    a_on_fold0 = exp.task.score(exp.train.Y[fold0], exp_dir.model("a").load_oof()[fold0])
    line = next(row for row in report.splitlines() if row.startswith("| a |"))
    assert line.split("|")[2].strip() == f"{a_on_fold0:.5f}"
    assert f"on the final's {int(fold0.sum())} rows" in report
