"""Odd JSON turns (a lone surrogate, true/false, numbers, null) are normalised and counted
before any tokenizer sees them, and such rows pass tfidf, embed, finetune and predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w

import hybridstack
from hybridstack.commands.run import run_stage
from hybridstack.config import CleanConfig, TaskConfig
from hybridstack.runs import read_json
from hybridstack.synthetic import pairwise_frame, write_competition, write_tiny_deberta_v3
from hybridstack.tables import Table
from hybridstack.tasks import MultilabelTask, PairwiseTask

LONE = "\ud83d"  # half of a surrogate pair, which json.loads accepts from "\\ud83d"


def parse(frame: pd.DataFrame):
    task = PairwiseTask(TaskConfig(kind="pairwise"), CleanConfig())
    return task.parse(Table(frame.astype(str), Path("train.csv"), 0), labelled=False)


def test_odd_turns_become_text_and_are_counted(caplog):
    frame = pd.DataFrame({
        "id": ["1", "2"],
        "prompt": [json.dumps([f"smile {LONE}"]), json.dumps(["hi", None])],
        "response_a": [json.dumps([True]), json.dumps([42, 1.5])],
        "response_b": [json.dumps([False, None]), json.dumps([["nested"]])],
    })
    assert '"\\ud83d"' in frame["prompt"][0].replace("smile ", "")  # as the CSV holds it
    ds = parse(frame)
    assert ds.fields["prompt"] == ["smile \ufffd", "hi"]
    assert ds.fields["response_a"] == ["true", "42\n\n1.5"]
    assert ds.fields["response_b"] == ["false", '["nested"]']
    assert {k: ds.stats[k] for k in ("lone_surrogates", "turns_bool", "turns_number",
                                     "turns_null", "turns_nested")} == {
        "lone_surrogates": 1, "turns_bool": 2, "turns_number": 2, "turns_null": 2, "turns_nested": 1}
    assert "1 lone UTF-16 surrogates replaced by U+FFFD" in caplog.text


def test_surrogates_in_plain_text_columns_are_replaced_too():
    task = MultilabelTask(TaskConfig(kind="multilabel", text_columns=["comment_text"]), CleanConfig())
    # object dtype: pandas' Arrow strings (pyarrow installed) cannot hold lone surrogates
    frame = pd.DataFrame({"id": ["1"], "comment_text": [f"bad {LONE}{LONE} text"]}, dtype=object)
    ds = task.parse(Table(frame, Path("test.csv"), 0), labelled=False)
    assert ds.fields["text"] == ["bad \ufffd\ufffd text"] and ds.stats["lone_surrogates"] == 2


def test_a_clean_table_counts_nothing_odd():
    ds = parse(pairwise_frame(5).drop(columns=["winner_model_a", "winner_model_b", "winner_tie"]))
    assert not any(ds.stats.get(k) for k in ("lone_surrogates", "turns_bool", "turns_null"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest


def test_odd_rows_pass_every_stage_and_predict(tmp_path):
    raw = write_competition(tmp_path / "data", "pairwise", n_train=90, n_test=12)
    for split in ("train", "test"):
        frame = pd.read_csv(raw["data"][split], dtype=str, keep_default_na=False)
        frame.loc[0, "prompt"] = json.dumps([f"why {LONE} this"])
        frame.loc[1, "response_a"] = json.dumps([True])
        frame.loc[2, "response_b"] = json.dumps([42, None])
        frame.to_csv(raw["data"][split], index=False)
    model = write_tiny_deberta_v3(tmp_path / "deberta", list(pairwise_frame(60)["response_a"]))
    raw.update({
        "experiment": "odd", "workdir": str(tmp_path / "work"), "cv": {"n_splits": 3},
        "tfidf": {"max_word_features": 2000, "max_char_features": 4000, "min_df": 1},
        "embed": {"model": "embedded:minilm", "prefix": "", "max_seq_length": 64, "knn": False,
                  "lgbm": [{"n_estimators": 30, "early_stopping_rounds": 5, "num_leaves": 7,
                            "min_child_samples": 5, "num_threads": 1}],
                  "mlp": [{"hidden_sizes": [16], "max_epochs": 3}]},
        "finetune": {"model": str(model), "folds": [0], "epochs": 1, "max_length": 48,
                     "batch_size": 16, "eval_batch_size": 64},
        "stack": {"enabled": True},
    })
    config = tmp_path / "odd.toml"
    config.write_text(tomli_w.dumps(raw))
    for stage in ("tfidf", "embed", "finetune", "stack"):
        run_stage(stage, str(config), [])
    run_dir = tmp_path / "work" / "runs" / "odd"
    stats = read_json(run_dir / "dataset.json")["train_stats"]
    assert stats["lone_surrogates"] == 1 and stats["turns_bool"] == 1
    assert stats["turns_number"] == 1 and stats["turns_null"] >= 1  # synthetic rows have nulls too
    submission = pd.read_csv(run_dir / "submission.csv")
    assert len(submission) == 12 and np.isfinite(submission.iloc[:, 1:].to_numpy()).all()
    predictor = hybridstack.load(run_dir)
    row = {"prompt": json.dumps([f"a {LONE} b"]), "response_a": json.dumps([True]),
           "response_b": json.dumps([7, None])}
    proba = predictor.predict_proba([row])
    assert proba.shape == (1, 3) and np.isclose(proba.sum(), 1.0, atol=1e-5)
    raw = {"prompt": [f"a {LONE} b"], "response_a": [f"plain {LONE}", None], "response_b": ["x"]}
    assert predictor.predict_proba([raw]).shape == (1, 3)  # Python lists, unescaped
