"""hybridstack sweep and compare on tiny synthetic data."""

import numpy as np
import pandas as pd

import hybridstack
from hybridstack.cli import main
from hybridstack.commands.compare import compare_rows
from hybridstack.commands.sweep import combination_name, parse_grid


def test_parse_grid_keeps_lists_whole():
    axes = parse_grid(["finetune.lr=2e-5,3e-5", "finetune.folds=[0,1],[2]"])
    assert axes[0].values == ["2e-5", "3e-5"]
    assert axes[1].values == ["[0,1]", "[2]"]
    assert combination_name("base", {"finetune.lr": "2e-5"}) == "base__lr=2e-5"


def test_grid_2x2_creates_four_experiments_skips_rerun_and_compares(make_config, capsys):
    cfg, path = make_config("multiclass", n_train=120, n_test=20)
    grid = ["--grid", "tfidf.models.C=0.5,4", "--grid", "tfidf.models.class_weight='balanced',''"]
    assert main(["sweep", "-c", str(path), "--stage", "tfidf", *grid]) == 2  # '' is not a valid class_weight
    assert "class_weight" in capsys.readouterr().err

    grid = ["--grid", "tfidf.models.C=0.5,4", "--grid", "tfidf.max_char_features=1000,4000"]
    assert main(["sweep", "-c", str(path), "--stage", "tfidf", *grid]) == 0
    out = capsys.readouterr().out
    runs = sorted(p.name for p in (cfg.workdir / "runs").iterdir())
    assert len(runs) == 4 and all(r.startswith("exp_multiclass__C=") for r in runs)
    folds = [np.load(cfg.workdir / "runs" / r / "folds.npy") for r in runs]
    assert all(np.array_equal(folds[0], f) for f in folds)
    # two matrix settings -> two cached TF-IDF matrices shared by the four experiments
    assert len(list((cfg.workdir / "cache" / "features").glob("tfidf_*.joblib"))) == 2
    assert "4 ok, 0 failed" in out

    mtimes = {r: (cfg.workdir / "runs" / r / "models/tfidf_logreg/oof.npy").stat().st_mtime_ns for r in runs}
    assert main(["sweep", "-c", str(path), "--stage", "tfidf", *grid]) == 0
    assert mtimes == {r: (cfg.workdir / "runs" / r / "models/tfidf_logreg/oof.npy").stat().st_mtime_ns
                      for r in runs}

    capsys.readouterr()
    rows = compare_rows(cfg.workdir)
    assert len(rows) == 4
    cvs = [r["cv"] for r in rows]
    assert cvs == sorted(cvs)  # log loss: best (lowest) first
    assert {"tfidf.models.0.C", "tfidf.max_char_features"} <= set(rows[0])
    assert main(["compare", str(cfg.workdir), "--format", "markdown"]) == 0
    table = capsys.readouterr().out
    assert table.count("exp_multiclass__") == 4 and "tfidf.models.0.C" in table


def test_failing_combination_is_reported_and_sweep_continues(make_config, capsys, monkeypatch):
    cfg, path = make_config("multiclass", n_train=90, n_test=10)
    import hybridstack.commands.sweep as sweep
    from hybridstack.errors import HybridstackError

    real = sweep.run_stage

    def flaky(stage, config, overrides):
        if any("C=0.5" in o for o in overrides):
            raise HybridstackError("simulated failure")
        return real(stage, config, overrides)

    monkeypatch.setattr(sweep, "run_stage", flaky)
    assert main(["sweep", "-c", str(path), "--stage", "tfidf", "--grid", "tfidf.models.C=0.5,4"]) == 1
    out = capsys.readouterr().out
    assert "FAILED exp_multiclass__C=0.5: simulated failure" in out
    assert (cfg.workdir / "runs" / "exp_multiclass__C=4" / "models/tfidf_logreg/DONE").is_file()


def test_compare_heldout_scores(make_config, capsys, tmp_path):
    cfg, path = make_config("multilabel", n_train=120, n_test=40)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    # labels of the synthetic test rows: regenerate the full frame and keep the test part
    from hybridstack.synthetic import multilabel_frame

    full = multilabel_frame(160, seed=0)
    labels = tmp_path / "test_labels.csv"
    full.iloc[120:].drop(columns=["comment_text"]).to_csv(labels, index=False)
    rows = compare_rows(cfg.workdir, labels=labels)
    assert 0.6 < rows[0]["heldout"] <= 1.0


class CountingEncoder:
    """A stand-in sentence encoder: a fixed unit vector per text; records every text it encodes."""

    max_seq_length = 64

    def __init__(self):
        self.texts: list[str] = []

    def get_embedding_dimension(self):
        return 8

    def encode(self, texts, **kwargs):
        import hashlib

        self.texts.extend(texts)
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
        vectors = np.stack([np.random.default_rng(s).standard_normal(8) for s in seeds])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_embed_sweep_encodes_each_text_once_in_total(make_config, capsys, monkeypatch):
    from hybridstack.features import embeddings

    encoder = CountingEncoder()
    monkeypatch.setattr(embeddings, "_load_model", lambda path, device: encoder)
    cfg, path = make_config("pairwise", n_train=90, n_test=20, embed={
        "enabled": True, "model": "embedded:minilm", "prefix": "", "max_seq_length": 64,
        "lgbm": [{"name": "lgbm", "n_estimators": 20, "num_threads": 1}],
        "mlp": [{"name": "mlp", "max_epochs": 3}]})
    grid = ["--grid", "embed.lgbm.num_leaves=4,8", "--grid", "embed.mlp.dropout=0.1,0.3"]
    assert main(["sweep", "-c", str(path), "--stage", "embed", *grid]) == 0
    runs = sorted(p.name for p in (cfg.workdir / "runs").iterdir())
    assert len(runs) == 4
    assert len(encoder.texts) == len(set(encoder.texts))  # no text encoded twice, across all four
    assert encoder.texts  # and something was encoded (by the first experiment)
    n_encoded = len(encoder.texts)
    assert main(["sweep", "-c", str(path), "--stage", "embed", *grid]) == 0
    assert len(encoder.texts) == n_encoded  # the re-run encodes nothing and refits nothing
    rows = compare_rows(cfg.workdir)
    assert len(rows) == 8  # two heads in each of the four experiments
    assert {"embed.lgbm.0.num_leaves", "embed.mlp.0.dropout"} <= set(rows[0])


def test_stack_blends_models_from_sibling_experiments_and_refuses_other_folds(make_config, capsys):
    cfg, path = make_config("multiclass", n_train=150, n_test=30)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    other = ["--set", "experiment='other'", "--set", "tfidf.models=[{name='tfidf_weak', C=0.05}]"]
    assert main(["run", "tfidf", "-c", str(path), *other]) == 0
    stack = ["--set", "stack.enabled=true", "--set", "stack.models=['tfidf_logreg', 'other/tfidf_weak']"]
    assert main(["run", "stack", "-c", str(path), *stack]) == 0
    weights = (cfg.run_dir / "stack" / "weights.json").read_text()
    assert "other/tfidf_weak" in weights and "tfidf_logreg" in weights
    # the predictor finds the sibling model too and reproduces the stacked test predictions
    test_rows = pd.read_csv(cfg.data.test, dtype=str, keep_default_na=False)
    predicted = hybridstack.load(cfg.run_dir).predict_proba(test_rows)
    np.testing.assert_allclose(predicted, np.load(cfg.run_dir / "stack" / "test.npy"), atol=1e-6)
    capsys.readouterr()

    reseeded = ["--set", "experiment='reseeded'", "--set", "cv.seed=7",
                "--set", "tfidf.models=[{name='tfidf_weak', C=0.05}]"]
    assert main(["run", "tfidf", "-c", str(path), *reseeded]) == 0
    capsys.readouterr()
    mixed = ["--set", "stack.enabled=true", "--set", "stack.models=['tfidf_logreg', 'reseeded/tfidf_weak']"]
    assert main(["run", "stack", "-c", str(path), *mixed]) == 2
    assert "other data or folds" in capsys.readouterr().err
