"""The embed stage end to end (real MiniLM on tiny synthetic data) and its feature assembly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hybridstack.config import CleanConfig, EmbedConfig, TaskConfig, config_from_dict
from hybridstack.errors import HybridstackError
from hybridstack.experiment import open_experiment
from hybridstack.features import embed_matrix
from hybridstack.features.knn import KNNFeatureHead
from hybridstack.heads.base import predict_views
from hybridstack.heads.lgbm import LightGBMHead
from hybridstack.stages import embed as embed_stage
from hybridstack.tasks import Dataset, PairwiseTask

FAST_EMBED = {
    "enabled": True, "model": "embedded:minilm", "prefix": "", "max_seq_length": 64, "knn_k": 5,
    "lgbm": [{"name": "lgbm", "n_estimators": 50, "num_threads": 1, "min_child_samples": 5}],
    "mlp": [{"name": "mlp", "max_epochs": 5, "hidden_sizes": [64]}],
}
JIGSAW_10K = Path(__file__).resolve().parents[2] / "shared" / "data" / "jigsaw-toxic-10k" / "source" / "train_10k.csv"


def must_not_run(*args, **kwargs):
    raise AssertionError("a finished head or cached feature matrix was recomputed")


@pytest.mark.parametrize("kind", ["multiclass", "multilabel", "pairwise"])
def test_stage_fits_every_head_beats_the_prior_and_skips_on_rerun(make_config, monkeypatch, kind):
    cfg, _ = make_config(kind, embed=FAST_EMBED)
    embed_stage.run(cfg)
    exp = open_experiment(cfg)
    Y = exp.train.Y
    prior_score = exp.task.score(Y, np.tile(Y.mean(axis=0), (len(Y), 1)))
    for name in ("minilm_lgbm", "minilm_mlp"):
        model = exp.dir.model(name)
        oof, test_pred = model.load_oof(), model.load_test()
        assert oof.shape == (120, exp.task.n_classes) and test_pred.shape == (40, exp.task.n_classes)
        assert not np.isnan(oof).any() and not np.isnan(test_pred).any()
        assert exp.task.is_better(exp.task.score(Y, oof), prior_score), name
        assert (model.path / "fold_0" / "model.joblib").is_file()
    assert exp.dir.submission_path.is_file()

    monkeypatch.setattr(embed_stage, "fit_oof", must_not_run)
    monkeypatch.setattr(embed_matrix, "build_features", must_not_run)
    embed_stage.run(cfg)  # both heads DONE with the same config: nothing is refitted


def test_a_new_head_reuses_cached_features_and_leaves_finished_heads_alone(make_config, monkeypatch):
    one_head = {**FAST_EMBED, "lgbm": [], "knn": False}
    cfg, _ = make_config("multiclass", embed=one_head)
    embed_stage.run(cfg)
    exp = open_experiment(cfg)
    done_stamp = os.stat(exp.dir.model("minilm_mlp").done_path).st_mtime_ns

    two_heads = {**one_head, "mlp": [*one_head["mlp"], {"name": "mlp_wide", "max_epochs": 2}]}
    cfg_more, _ = make_config("multiclass", embed=two_heads)
    monkeypatch.setattr(embed_matrix, "build_features", must_not_run)
    embed_stage.run(cfg_more)
    assert exp.dir.model("minilm_mlp_wide").is_done()
    assert os.stat(exp.dir.model("minilm_mlp").done_path).st_mtime_ns == done_stamp


def pairwise_dataset(n: int, swapped: bool = False) -> tuple[Dataset, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    words = np.array("alpha beta gamma delta\n- item\n```code```\n# head".split(" "))
    texts = {f: [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(n)]
             for f in ("prompt", "response_a", "response_b")}
    emb = {f: rng.normal(size=(n, 8)).astype(np.float32) for f in texts}
    if swapped:
        for mapping in (texts, emb):
            mapping["response_a"], mapping["response_b"] = mapping["response_b"], mapping["response_a"]
    ids = np.arange(n).astype(str)
    return Dataset(ids=ids, fields=texts, Y=None, groups=np.asarray(texts["prompt"], dtype=object)), emb


def test_swapping_a_and_b_swaps_the_features_and_the_predicted_winner():
    task = PairwiseTask(TaskConfig(kind="pairwise"), CleanConfig())
    ds, emb = pairwise_dataset(80)
    ds_swapped, emb_swapped = pairwise_dataset(80, swapped=True)
    X, X_swap, blocks, key_columns = embed_matrix.split_views(task, ds, emb, length_features=True)
    X2, X2_swap, _, _ = embed_matrix.split_views(task, ds_swapped, emb_swapped, length_features=True)
    np.testing.assert_array_equal(X2, X_swap)
    np.testing.assert_array_equal(X2_swap, X)
    assert X.shape[1] == sum(width for _, width in blocks) == 5 * 8 + 3 + 4 * 6
    assert key_columns == (0, 24)

    rng = np.random.default_rng(1)
    Y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 80)]
    group = np.arange(80, dtype=np.float32)[:, None]
    Xg, Xg_swap = np.hstack([X, group]), np.hstack([X_swap, group])
    perm = task.swap_permutation
    head = KNNFeatureHead(LightGBMHead(n_estimators=20, num_threads=1, min_child_samples=5),
                          key_start=0, key_stop=24, k=5)
    head.fit(np.vstack([Xg, Xg_swap]), np.vstack([Y, Y[:, perm]]))
    original = predict_views(head, Xg, Xg_swap, perm)
    swapped = predict_views(head, np.hstack([X2, group]), np.hstack([X2_swap, group]), perm)
    np.testing.assert_allclose(swapped, original[:, perm], rtol=1e-6)


def test_exclusion_groups_join_duplicates_across_splits_and_pairwise_prompts():
    from hybridstack.tasks import MultilabelTask

    task = MultilabelTask(TaskConfig(kind="multilabel"), CleanConfig())
    train = Dataset(ids=np.array(["1", "2", "3"]), fields={"text": ["a", "b", "a"]}, Y=None)
    test = Dataset(ids=np.array(["4", "5"]), fields={"text": ["b", "c"]}, Y=None)
    train_groups, test_groups = embed_matrix.exclusion_groups(task, [train, test])
    assert train_groups[0] == train_groups[2] == 0 and train_groups[1] == test_groups[0] == 1
    assert test_groups[1] not in train_groups and train_groups.dtype == np.float32

    pairwise = PairwiseTask(TaskConfig(kind="pairwise"), CleanConfig())
    ds, _ = pairwise_dataset(30)
    (codes,) = embed_matrix.exclusion_groups(pairwise, [ds])
    prompts = np.asarray(ds.fields["prompt"])
    assert all((codes == codes[i]).sum() == (prompts == prompts[i]).sum() for i in range(30))


@pytest.mark.parametrize(("model", "alias"), [
    ("intfloat/e5-small-v2", "e5"), ("embedded:minilm", "minilm"),
    ("sentence-transformers/all-MiniLM-L6-v2", "minilm"), ("BAAI/bge-small-en-v1.5", "bge"),
    ("/kaggle/input/e5-base-v2", "e5"),
])
def test_alias_is_derived_from_the_model_name(model, alias):
    assert embed_stage.embed_alias(EmbedConfig(model=model)) == alias
    assert embed_stage.embed_alias(EmbedConfig(model=model, alias="mine")) == "mine"


def test_duplicate_head_names_are_a_config_error(make_config):
    clash = {"lgbm": [{"name": "head"}], "mlp": [{"name": "head"}]}
    with pytest.raises(HybridstackError, match="unique"):
        make_config("multiclass", embed=clash)


def test_missing_model_folder_fails_before_any_training(make_config, tmp_path):
    cfg, _ = make_config("multiclass", embed={**FAST_EMBED, "model": str(tmp_path / "no_model")})
    with pytest.raises(HybridstackError, match="embed.model"):
        embed_stage.run(cfg)
    assert not open_experiment(cfg).dir.models_dir.exists()


def test_disabled_stage_does_nothing(make_config, capsys):
    cfg, _ = make_config("multiclass")  # the test defaults switch embed off
    embed_stage.run(cfg)
    assert "disabled" in capsys.readouterr().out
    assert not cfg.run_dir.exists()


@pytest.mark.slow
@pytest.mark.skipif(not JIGSAW_10K.is_file(), reason="needs ../shared/data")
def test_jigsaw_10k_heads_score_above_0_90(tmp_path):
    cfg = config_from_dict({
        "experiment": "jigsaw10k", "workdir": str(tmp_path),
        "task": {"kind": "multilabel", "text_columns": ["comment_text"]},
        "data": {"train": str(JIGSAW_10K)}, "cv": {"n_splits": 5, "seed": 42},
        "tfidf": {"enabled": False}, "finetune": {"enabled": False}, "stack": {"enabled": False},
        "embed": {"model": "embedded:minilm", "prefix": "", "max_seq_length": 256,
                  "lgbm": [{"name": "lgbm", "learning_rate": 0.1, "early_stopping_rounds": 50,
                            "num_threads": 1}]},
    })
    embed_stage.run(cfg)
    exp = open_experiment(cfg)
    for name in ("minilm_lgbm", "minilm_mlp"):
        assert exp.dir.model(name).load_scores()["overall"] > 0.90, name
