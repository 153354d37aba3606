"""The Kaggle inference notebook: `predict --submission` from an attached run folder that is
never written to, without train.csv, agreeing with the training run's own submission."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
import torch

from hybridstack.cli import main
from hybridstack.commands.run import run_stage
from hybridstack.features.knn import GROUP_MAP_FILE, UNSEEN_GROUP, GroupMap
from hybridstack.synthetic import pairwise_frame, write_competition, write_tiny_deberta_v3

ATOL = 1e-6
LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def attached(tmp_path_factory) -> dict[str, Path]:
    """A finished pairwise run (tfidf, embed with kNN, fine-tune, stack) moved elsewhere as
    Kaggle attaches a notebook's output, with train.csv gone."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("kaggle")
    raw = write_competition(root / "input" / "comp", "pairwise", n_train=120, n_test=30)
    model = write_tiny_deberta_v3(root / "deberta", list(pairwise_frame(60)["response_a"]))
    raw.update({
        "experiment": "lmsys", "workdir": str(root / "working"), "cv": {"n_splits": 3},
        "tfidf": {"max_word_features": 2000, "max_char_features": 4000, "min_df": 1},
        "embed": {"model": "embedded:minilm", "prefix": "", "max_seq_length": 64,
                  "lgbm": [{"n_estimators": 40, "early_stopping_rounds": 10, "num_leaves": 7,
                            "min_child_samples": 5, "num_threads": 1}],
                  "mlp": [{"hidden_sizes": [16], "max_epochs": 4}]},
        "finetune": {"model": str(model), "folds": [0], "epochs": 1, "max_length": 48,
                     "batch_size": 16, "eval_batch_size": 64},
        "stack": {"methods": ["weighted", "logreg"]},
    })
    config = root / "lmsys.toml"
    config.write_text(tomli_w.dumps(raw))
    for stage in ("tfidf", "embed", "finetune", "stack"):
        run_stage(stage, str(config), [])
    # the inference notebook: the training output attached under the input root
    shutil.move(root / "working", root / "input" / "training-output")
    (root / "input" / "comp" / "train.csv").unlink()
    return {"root": root, "workdir": root / "input" / "training-output",
            "run": root / "input" / "training-output" / "runs" / "lmsys",
            "test": root / "input" / "comp" / "test.csv",
            "sample": root / "input" / "comp" / "sample_submission.csv"}


def predict(attached, tmp: Path, *extra: str, input_path: Path | None = None) -> int:
    return main(["predict", str(attached["run"]), "--input", str(input_path or attached["test"]),
                 "--cache-dir", str(tmp / "cache"), *extra])


def test_submission_equals_the_runs_own_without_train_csv_and_writes_nothing_attached(
        attached, tmp_path):
    before = tree_digest(attached["workdir"])
    out = tmp_path / "submission.csv"
    assert predict(attached, tmp_path, "--submission", str(out)) == 0
    assert tree_digest(attached["workdir"]) == before  # the attached folder stays as it was
    ours = pd.read_csv(out, dtype={"id": str})
    theirs = pd.read_csv(attached["run"] / "submission.csv", dtype={"id": str})
    assert list(ours.columns) == list(pd.read_csv(attached["sample"]).columns)  # no pred_* columns
    test_ids = pd.read_csv(attached["test"], dtype={"id": str})["id"].tolist()
    assert ours["id"].tolist() == test_ids  # the input's order
    np.testing.assert_allclose(ours.set_index("id").loc[theirs["id"], LABELS].to_numpy(),
                               theirs[LABELS].to_numpy(), atol=ATOL)


def test_another_row_set_in_another_order_gives_the_same_rows(attached, tmp_path):
    full = tmp_path / "full.csv"
    assert predict(attached, tmp_path, "--submission", str(full)) == 0
    test = pd.read_csv(attached["test"], dtype=str, keep_default_na=False)
    hidden = test.sample(frac=0.5, random_state=0)  # another row set, shuffled
    hidden_path = tmp_path / "hidden.csv"
    hidden.to_csv(hidden_path, index=False)
    sample = pd.read_csv(attached["sample"], dtype={"id": str}).set_index("id").loc[hidden["id"]]
    sample_path = tmp_path / "hidden_sample.csv"
    sample.reset_index().to_csv(sample_path, index=False)
    out = tmp_path / "hidden_sub.csv"
    both = tmp_path / "hidden_rich.csv"
    assert predict(attached, tmp_path, "--submission", str(out), "--sample", str(sample_path),
                   "--output", str(both), input_path=hidden_path) == 0
    part = pd.read_csv(out, dtype={"id": str})
    assert part["id"].tolist() == hidden["id"].tolist()
    reference = pd.read_csv(full, dtype={"id": str}).set_index("id").loc[part["id"], LABELS]
    np.testing.assert_allclose(part[LABELS].to_numpy(), reference.to_numpy(), atol=ATOL)
    rich = pd.read_csv(both, dtype={"id": str})
    assert {"pred_label", *LABELS} <= set(rich.columns)  # --output keeps the richer file
    np.testing.assert_allclose(rich[LABELS].to_numpy(), part[LABELS].to_numpy(), atol=ATOL)


def test_new_texts_are_encoded_into_the_cache_dir_only(attached, tmp_path):
    test = pd.read_csv(attached["test"], dtype=str, keep_default_na=False)
    fresh = test.head(4).copy()
    fresh["prompt"] = [f'["a prompt never seen before, number {i}"]' for i in range(4)]
    path = tmp_path / "fresh.csv"
    fresh.to_csv(path, index=False)
    before = tree_digest(attached["workdir"])
    assert predict(attached, tmp_path, "--output", str(tmp_path / "o.csv"), input_path=path) == 0
    assert tree_digest(attached["workdir"]) == before
    shards = list((tmp_path / "cache").rglob("shards/*.npy"))
    assert shards  # the 4 new prompts, layered over the attached cache
    rows = sum(np.load(s).shape[0] for s in shards)
    assert rows == 4  # only the texts the attached cache lacked were encoded


def test_ids_that_do_not_match_the_sample_are_one_line_and_nothing_is_written(
        attached, tmp_path, capsys):
    test = pd.read_csv(attached["test"], dtype=str, keep_default_na=False)
    path = tmp_path / "fewer.csv"
    test.head(10).to_csv(path, index=False)  # the run's sample has 30 ids
    out, rich = tmp_path / "sub.csv", tmp_path / "rich.csv"
    assert predict(attached, tmp_path, "--submission", str(out), "--output", str(rich),
                   input_path=path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not match the sample submission" in err[0] and "--sample" in err[0]
    assert not out.exists() and not rich.exists()


def test_a_missing_sample_is_one_line(attached, tmp_path, capsys):
    code = predict(attached, tmp_path, "--submission", str(tmp_path / "s.csv"),
                   "--sample", str(tmp_path / "nope.csv"))
    assert code == 2 and "sample submission not found" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_one_process_submission(attached, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert predict(attached, tmp_path, "--submission", str(one)) == 0
    assert predict(attached, tmp_path, "--submission", str(two), "--num-processes", "2",
                   "--cpu") == 0
    a, b = pd.read_csv(one, dtype={"id": str}), pd.read_csv(two, dtype={"id": str})
    assert a["id"].tolist() == b["id"].tolist()
    np.testing.assert_allclose(a[LABELS].to_numpy(), b[LABELS].to_numpy(), atol=ATOL)


def test_the_knn_group_map_travels_with_each_embed_model(attached):
    maps = sorted((attached["run"] / "models").glob(f"*/{GROUP_MAP_FILE}"))
    assert [p.parent.name for p in maps] == ["minilm_lgbm", "minilm_mlp"]
    group_map = GroupMap.load(maps[0])
    assert len(np.unique(group_map.groups)) == len(group_map.groups)  # one entry per prompt


def test_group_map_gives_a_train_rows_group_or_unseen():
    group_map = GroupMap.from_keys(np.array(["p1", "p2", "p1"], dtype=object), np.array([0, 1, 0]))
    np.testing.assert_array_equal(group_map.lookup(["p2", "new", "p1"]), [1, UNSEEN_GROUP, 0])
    assert group_map.lookup(["p2"]).dtype == np.float32


def test_prune_for_inference_keeps_what_predict_reads(attached, tmp_path, capsys):
    workdir = tmp_path / "copy"
    shutil.copytree(attached["workdir"], workdir)
    stale = workdir / "runs" / "lmsys" / "models" / "deberta" / "fold_1" / "last"
    stale.mkdir(parents=True)
    (stale / "optimizer.bin").write_bytes(b"x" * 1000)  # an unfinished fold's resume state
    assert (workdir / "cache" / "features").is_dir()
    assert main(["cache", "prune", "--for-inference", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "kept for inference" in out and not stale.exists()
    assert not (workdir / "cache" / "features").exists()
    assert (workdir / "cache" / "embeddings").is_dir()
    sub = tmp_path / "after_prune.csv"
    assert main(["predict", str(workdir / "runs" / "lmsys"), "--input", str(attached["test"]),
                 "--submission", str(sub), "--cache-dir", str(tmp_path / "c")]) == 0
    theirs = pd.read_csv(attached["run"] / "submission.csv", dtype={"id": str})
    ours = pd.read_csv(sub, dtype={"id": str}).set_index("id").loc[theirs["id"]]
    np.testing.assert_allclose(ours[LABELS].to_numpy(), theirs[LABELS].to_numpy(), atol=ATOL)
