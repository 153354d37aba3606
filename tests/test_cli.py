"""The CLI end to end on tiny synthetic data, and bad input as one clear line."""

import json
import time

import joblib
import numpy as np
import pandas as pd
import pytest

from hybridstack.cli import main
from hybridstack.predict.families import TfidfModel
from hybridstack.predict.source import open_run
from hybridstack.runs import ExperimentDir
from hybridstack.tables import read_table


def _snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["pairwise", "multilabel", "multiclass"])
def test_tfidf_end_to_end(make_config, capsys, kind):
    cfg, path = make_config(kind, n_train=150, n_test=30)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tfidf_logreg: CV" in out
    exp = ExperimentDir(cfg.run_dir)
    model = exp.model("tfidf_logreg")
    oof, test = model.load_oof(), model.load_test()
    n_classes = {"pairwise": 3, "multilabel": 6, "multiclass": 3}[kind]
    assert oof.shape == (150, n_classes) and test.shape == (30, n_classes)
    assert not np.isnan(oof).any()
    scores = model.load_scores()
    # the synthetic signal is learnable: better than the prior
    if kind == "multilabel":
        assert scores["overall"] > 0.75
    else:
        assert scores["overall"] < 0.95 * np.log(oof.shape[1])
    sub = pd.read_csv(exp.submission_path, dtype={"id": str})
    sample = pd.read_csv(cfg.data.sample_submission, dtype={"id": str})
    assert list(sub.columns) == list(sample.columns)
    assert sub["id"].tolist() == sample["id"].tolist()
    folds = np.load(exp.folds_path)
    assert folds.dtype == np.int8 and len(folds) == 150
    dataset = json.loads(exp.dataset_path.read_text())
    assert dataset["n_train"] == 150 and dataset["task_kind"] == kind
    assert exp.config_path.is_file()


def test_second_run_is_skipped_and_new_C_reuses_matrix(make_config, capsys):
    cfg, path = make_config("multilabel", n_train=150, n_test=20)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    model = ExperimentDir(cfg.run_dir).model("tfidf_logreg")
    before = model.oof_path.stat().st_mtime_ns
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    assert model.oof_path.stat().st_mtime_ns == before  # skipped: nothing rewritten
    matrices = list((cfg.workdir / "cache" / "features").glob("tfidf_*.joblib"))
    matrix_mtime = matrices[0].stat().st_mtime_ns
    time.sleep(0.01)
    assert main(["run", "tfidf", "-c", str(path), "--set", "tfidf.models=[{name='tfidf_logreg', C=0.5}]"]) == 0
    assert model.oof_path.stat().st_mtime_ns != before  # retrained with the new C
    assert [m.stat().st_mtime_ns for m in (cfg.workdir / "cache" / "features").glob("tfidf_*.joblib")] == [matrix_mtime]


def test_adding_a_second_tfidf_model_refits_only_it(make_config, capsys):
    cfg, path = make_config("multiclass", n_train=120, n_test=20)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    first = ExperimentDir(cfg.run_dir).model("tfidf_logreg")
    before = first.oof_path.stat().st_mtime_ns
    both = "tfidf.models=[{name='tfidf_logreg'}, {name='tfidf_logreg_c4', C=4.0}]"
    assert main(["run", "tfidf", "-c", str(path), "--set", both]) == 0
    out = capsys.readouterr().out
    assert first.oof_path.stat().st_mtime_ns == before  # the first model is kept as it was
    assert "tfidf_logreg_c4: CV" in out and ExperimentDir(cfg.run_dir).model("tfidf_logreg_c4").is_done()


def test_pairwise_prompt_never_in_two_folds(make_config):
    cfg, path = make_config("pairwise", n_train=150, n_test=10)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    train = pd.read_csv(cfg.data.train)
    folds = np.load(ExperimentDir(cfg.run_dir).folds_path)
    assert train.assign(fold=folds).groupby("prompt")["fold"].nunique().max() == 1


def test_folds_are_reproducible_across_experiments(make_config):
    cfg_a, path_a = make_config("multiclass", n_train=90, n_test=10)
    main(["run", "tfidf", "-c", str(path_a)])
    main(["run", "tfidf", "-c", str(path_a), "--set", "experiment='again'"])
    a = np.load(cfg_a.run_dir / "folds.npy")
    b = np.load(cfg_a.workdir / "runs" / "again" / "folds.npy")
    assert np.array_equal(a, b)
    oof_a = np.load(cfg_a.run_dir / "models/tfidf_logreg/oof.npy")
    oof_b = np.load(cfg_a.workdir / "runs/again/models/tfidf_logreg/oof.npy")
    assert np.array_equal(oof_a, oof_b)  # bit-identical on CPU with the same seed


def test_no_test_file_runs_cv_only(make_config, capsys):
    cfg, path = make_config("multiclass", n_train=90, n_test=10)
    text = path.read_text()
    path.write_text("\n".join(line for line in text.splitlines()
                              if not line.startswith(("test =", "sample_submission ="))))
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    assert "cross-validation only" in capsys.readouterr().out
    assert not (cfg.run_dir / "submission.csv").exists()


def _corrupt(cfg, which, mutate):
    path = getattr(cfg.data, which)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    mutate(frame)
    frame.to_csv(path, index=False)


BAD_INPUTS = [
    ("missing column", "multilabel", "train", lambda f: f.drop(columns=["toxic"], inplace=True),
     "missing column(s) 'toxic'"),
    ("labels outside 0/1", "multilabel", "train", lambda f: f.loc.__setitem__((0, "insult"), "3"),
     "column 'insult' must hold 0 or 1"),
    ("duplicate ids", "multiclass", "train", lambda f: f.loc.__setitem__((1, "id"), f.loc[0, "id"]),
     "duplicate ids"),
    ("malformed JSON", "pairwise", "train", lambda f: f.loc.__setitem__((0, "response_a"), '["oops'),
     "'response_a' is not valid JSON"),
    ("winner not one-hot", "pairwise", "train", lambda f: f.loc.__setitem__((0, "winner_tie"), "1")
     if f.loc[0, "winner_tie"] == "0" else f.loc.__setitem__((0, "winner_model_a"), "1"), "not one-hot"),
    ("test ids differ from sample", "multiclass", "test", lambda f: f.loc.__setitem__((0, "id"), "zzz"),
     "test ids differ from the sample submission"),
]


@pytest.mark.parametrize("case, kind, which, mutate, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_line_and_artifacts_untouched(make_config, capsys, case, kind, which, mutate, message):
    cfg, path = make_config(kind, n_train=90, n_test=15)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    before = _snapshot(cfg.run_dir)
    _corrupt(cfg, which, mutate)
    capsys.readouterr()
    assert main(["run", "tfidf", "-c", str(path), "--set", "tfidf.models=[{name='other'}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert _snapshot(cfg.run_dir) == before  # nothing half written, nothing lost


def test_config_errors_are_one_line(make_config, capsys, tmp_path):
    _, path = make_config("multiclass", n_train=60, n_test=10)
    assert main(["run", "tfidf", "-c", str(path), "--set", "tfidf.bogus=1"]) == 2
    assert "unknown config key 'tfidf.bogus'" in capsys.readouterr().err
    assert main(["run", "tfidf", "-c", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_changed_train_file_is_refused(make_config, capsys):
    cfg, path = make_config("multiclass", n_train=60, n_test=10)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    frame = pd.read_csv(cfg.data.train)
    frame.iloc[:50].to_csv(cfg.data.train, index=False)
    assert main(["run", "tfidf", "-c", str(path)]) == 2
    assert "made from different inputs (changed: files)" in capsys.readouterr().err


def test_dedup_drops_exact_duplicates(make_config, caplog):
    cfg, path = make_config("multiclass", n_train=60, n_test=10)
    frame = pd.read_csv(cfg.data.train)
    dup = frame.iloc[:5].copy()
    dup["id"] = [f"dup{i}" for i in range(5)]
    dup.loc[dup.index[0], "label"] = "sports" if dup.iloc[0]["label"] != "sports" else "tech"
    pd.concat([frame, dup]).to_csv(cfg.data.train, index=False)
    assert main(["run", "tfidf", "-c", str(path), "--set", "data.clean.dedup=true"]) == 0
    dataset = json.loads((cfg.run_dir / "dataset.json").read_text())
    assert dataset["n_train"] == 60
    assert dataset["train_stats"]["dedup_dropped"] == 5
    assert dataset["train_stats"]["dedup_conflicts"] == 1


def test_failing_stage_keeps_the_config_snapshot_of_the_last_model(make_config, capsys, tmp_path):
    cfg, path = make_config("multiclass", n_train=60, n_test=10)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    snapshot = (cfg.run_dir / "config.toml").read_bytes()
    missing = tmp_path / "no_such_model"
    assert main(["run", "embed", "-c", str(path), "--set", "embed.enabled=true",
                 "--set", f"embed.model='{missing}'"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert (cfg.run_dir / "config.toml").read_bytes() == snapshot


def test_shape_features_join_the_tfidf_matrix_and_predict_reproduces_them(make_config):
    cfg, path = make_config("pairwise", n_train=120, n_test=20,
                            tfidf={"shape_features": True, "models": [{"name": "shaped"}]})
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    model = ExperimentDir(cfg.run_dir).model("shaped")
    saved = joblib.load(model.path / "featurizer.joblib")
    assert saved.shape_scale.shape == (6 * 4,)  # prompt, A, B and A - B: 6 counts each
    ctx = open_run(cfg.run_dir)
    predictor = TfidfModel(model, json.loads(model.config_path.read_text()), ctx)
    test = ctx.task.parse(read_table(cfg.data.test), labelled=False)
    X, X_swap = predictor.featurizer.transform(test)
    n_ngrams = len(saved.vectorizer.get_feature_names_out())
    assert X.shape[1] == 4 * n_ngrams + 24 and X_swap.shape == X.shape
    assert abs(X[:, -24:].toarray()).max() <= 1.5  # scaled like the TF-IDF values
    np.testing.assert_allclose(predictor.predict((X, X_swap)), model.load_test(), atol=1e-6)
