"""Predict and explain: hybridstack.load() reproduces every saved test prediction, the CLI,
explanations and bad input. One tiny experiment per task kind, built once per module."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import tomli_w
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

import hybridstack
from hybridstack.cli import main
from hybridstack.commands.run import run_stage
from hybridstack.errors import HybridstackError
from hybridstack.features.embed_matrix import EmbedFeaturizer, exclusion_groups
from hybridstack.finetune.data import TokenFeaturizer
from hybridstack.models import EMBEDDED_MINILM, resolve_model
from hybridstack.predict.explain import tree_feature_groups
from hybridstack.predict.families import EmbedModel
from hybridstack.runs import FEATURIZER_FILE, FOLD_MODEL_FILE, ExperimentDir, read_json
from hybridstack.synthetic import write_competition

ATOL = 1e-6
TFIDF = {"max_word_features": 2000, "max_char_features": 4000, "min_df": 1}
EMBED = {"model": "embedded:minilm", "prefix": "", "max_seq_length": 64,
         "lgbm": [{"n_estimators": 50, "early_stopping_rounds": 10, "num_leaves": 7,
                   "min_child_samples": 5, "num_threads": 1}],
         "mlp": [{"hidden_sizes": [32], "max_epochs": 5}]}
FINETUNE = {"folds": [0], "epochs": 1, "max_length": 32, "max_train_rows": 60, "batch_size": 16,
            "eval_batch_size": 64}
OFF = {"enabled": False}


def build(root: Path, kind: str, stages: list[str], n_test: int = 30, **sections) -> Path:
    """Write a synthetic competition, run ``stages`` on it, return the run folder."""
    raw = write_competition(root / "data", kind, n_train=120, n_test=n_test)
    raw.update({"experiment": f"exp_{kind}", "workdir": str(root / "work"), "cv": {"n_splits": 3},
                "tfidf": TFIDF, "embed": OFF, "finetune": OFF, "stack": OFF, **sections})
    config = root / f"{kind}.toml"
    config.write_text(tomli_w.dumps(raw))
    for stage in stages:
        run_stage(stage, str(config), [])
    return root / "work" / "runs" / raw["experiment"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with MiniLM's tokenizer: fine-tunes and predicts in a second."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(EMBEDDED_MINILM, "test")))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairwise_run(tmp_path_factory, tiny_bert) -> Path:
    return build(tmp_path_factory.mktemp("pairwise"), "pairwise",
                 ["tfidf", "embed", "finetune", "stack"], embed=EMBED,
                 finetune={**FINETUNE, "model": str(tiny_bert)},
                 stack={"methods": ["weighted", "logreg"]})


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("multilabel"), "multilabel", ["tfidf", "embed", "stack"],
                 embed=EMBED, stack={"methods": ["lgbm", "weighted"], "meta_features": True})


@pytest.fixture(scope="module")
def predictors(pairwise_run, multilabel_run) -> dict:
    return {"pairwise": hybridstack.load(pairwise_run),
            "multilabel": hybridstack.load(multilabel_run)}


def tfidf_only(root: Path, stages: list[str]) -> Path:
    """A cheap multiclass experiment (two LR models + stack) for tests that damage it."""
    two_models = {**TFIDF, "models": [{"name": "lr_a", "C": 1.0}, {"name": "lr_b", "C": 10.0}]}
    return build(root, "multiclass", stages, n_test=20, tfidf=two_models,
                 stack={"methods": ["weighted"]})


def read_test_csv(run_dir: Path) -> pd.DataFrame:
    """The experiment's own test file, every cell a str."""
    data = run_dir.parent.parent.parent / "data"
    return pd.read_csv(data / "test.csv", dtype=str, keep_default_na=False)


# -- predictions equal the saved test outputs ----------------------------------------------------


@pytest.mark.parametrize("kind", ["pairwise", "multilabel"])
def test_predictions_equal_every_saved_test_output(predictors, pairwise_run, multilabel_run, kind):
    run_dir = {"pairwise": pairwise_run, "multilabel": multilabel_run}[kind]
    predictor, exp_dir = predictors[kind], ExperimentDir(run_dir)
    test = read_test_csv(run_dir)
    base = predictor.predict_base(test)
    families = {type(m).__name__ for m in predictor.base_models}
    expected = {"TfidfModel", "EmbedModel"} | ({"FinetuneModel"} if kind == "pairwise" else set())
    assert families == expected
    for name, pred in base.items():
        np.testing.assert_allclose(pred, exp_dir.model(name).load_test(), atol=ATOL, err_msg=name)
    proba = predictor.predict_proba(test)
    np.testing.assert_allclose(proba, exp_dir.stack.load_test(), atol=ATOL)
    submission = pd.read_csv(exp_dir.submission_path, dtype={"id": str}).set_index("id")
    np.testing.assert_allclose(proba, submission.loc[test["id"], predictor.label_names], atol=ATOL)


def test_model_folders_describe_themselves_and_embed_heads_share_one_knn_pool(pairwise_run):
    exp_dir = ExperimentDir(pairwise_run)
    (pool,) = (pairwise_run / "knn").glob("*.npy")
    stages = {}
    for model in exp_dir.finished_models():
        stages[model.name] = read_json(model.config_path)["stage"]
        featurizer = joblib.load(model.path / FEATURIZER_FILE)  # every base model has one
        if stages[model.name] == "embed":
            assert isinstance(featurizer, EmbedFeaturizer) and featurizer.pool_digest == pool.stem
            head = joblib.load(model.fold_dir(0) / FOLD_MODEL_FILE)
            assert head.pool_digest_ == pool.stem and not hasattr(head, "index_")
        if stages[model.name] == "finetune":
            assert isinstance(featurizer, TokenFeaturizer) and featurizer.swap is not None
    assert sorted(stages.values()) == ["embed", "embed", "finetune", "tfidf"]


def test_rows_may_be_dicts_with_lists_of_turns_and_no_id(predictors, pairwise_run):
    predictor = predictors["pairwise"]
    test = read_test_csv(pairwise_run).head(3)
    as_dicts = [{column: json.loads(row[column]) for column in ("prompt", "response_a", "response_b")}
                for _, row in test.iterrows()]
    np.testing.assert_allclose(predictor.predict_proba(as_dicts), predictor.predict_proba(test),
                               atol=ATOL)
    assert list(predictor.predict_frame(as_dicts)["id"]) == ["0", "1", "2"]


def test_new_rows_get_the_knn_groups_of_their_train_duplicates(predictors, multilabel_run):
    predictor = predictors["multilabel"]
    embed = next(m for m in predictor.base_models if isinstance(m, EmbedModel))
    train = embed.featurizer.ctx.train
    rows = train.subset(np.array([5, 17, 40]))
    groups = embed.featurizer.transform(rows).X[:, -1]
    train_groups = exclusion_groups(predictor.task, [train])[0]
    np.testing.assert_array_equal(groups, train_groups[[5, 17, 40]])
    fresh = predictor.parse([{"comment_text": "a text that no train row has"}])
    assert embed.featurizer.transform(fresh).X[0, -1] not in set(train_groups)


def test_prediction_writes_nothing_into_the_experiment(predictors, multilabel_run):
    def snapshot():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in multilabel_run.rglob("*")}

    before = snapshot()
    predictors["multilabel"].explain([{"comment_text": "You stupid idiot fool."}])
    assert snapshot() == before


# -- labels --------------------------------------------------------------------------------------


def test_multilabel_labels_use_the_stored_thresholds(predictors, multilabel_run):
    predictor = predictors["multilabel"]
    thresholds = read_json(multilabel_run / "stack" / "thresholds.json")
    cut = np.array([thresholds[name]["threshold"] for name in predictor.label_names])
    assert not np.allclose(cut, 0.5)  # else the test could not tell tuned from default cuts
    test = read_test_csv(multilabel_run)
    labels = predictor.predict(test)
    np.testing.assert_array_equal(labels, predictor.predict_proba(test) >= cut)
    frame = predictor.predict_frame(test)
    assert list(frame.columns) == ["id", *predictor.label_names,
                                   *(f"pred_{n}" for n in predictor.label_names)]


def test_single_label_predicts_the_argmax_class_name(predictors, pairwise_run):
    predictor = predictors["pairwise"]
    test = read_test_csv(pairwise_run)
    names = np.asarray(predictor.label_names)
    np.testing.assert_array_equal(predictor.predict(test),
                                  names[predictor.predict_proba(test).argmax(axis=1)])


# -- explanations --------------------------------------------------------------------------------


def _ngram_in_text(entry: dict, text: str) -> bool:
    text = text.lower()
    if entry["analyzer"] == "word":
        tokens = set(re.findall(r"\w+", text))
        return all(token in tokens for token in entry["ngram"].split())
    return entry["ngram"].strip() in text


def test_explanations_name_ngrams_of_the_text_and_known_features(predictors):
    predictor = predictors["multilabel"]
    text = "You are a stupid idiot and an ugly clown, please edit the article."
    explained = predictor.explain([{"comment_text": text}])[0]
    assert explained["labels"] == list(np.asarray(predictor.label_names)[predictor.predict(
        [{"comment_text": text}])[0] == 1])
    assert "toxic" in explained["labels"]
    ngrams = explained["models"]["tfidf_logreg"]["toxic"]
    assert ngrams and all(_ngram_in_text(e, text) and e["contribution"] > 0 for e in ngrams)
    assert ngrams[0]["ngram"] in {"stupid", "idiot"}  # the synthetic toxic trigger words
    embed = next(m for m in predictor.base_models if m.name == "minilm_lgbm")
    known = {name for name, _ in tree_feature_groups(embed.blocks, predictor.label_names)}
    features = explained["models"]["minilm_lgbm"]["toxic"]
    assert features and {e["feature"] for e in features} <= known
    shares = explained["stack"]["shares"]
    assert set(shares) == {m.name for m in predictor.base_models}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_pairwise_explanations_name_the_field_of_each_ngram(predictors, pairwise_run):
    predictor = predictors["pairwise"]
    row = read_test_csv(pairwise_run).iloc[[0]]
    explained = predictor.explain(row)[0]
    (label,) = explained["labels"]
    fields = {"prompt", "response_a", "response_b", "response_a-response_b"}
    ngrams = explained["models"]["tfidf_logreg"][label]
    assert ngrams and {e["field"] for e in ngrams} <= fields
    texts = {f: " ".join(t or "" for t in json.loads(row.iloc[0][f]))
             for f in ("prompt", "response_a", "response_b")}
    for entry in ngrams:
        sources = [texts[f] for f in entry["field"].split("-")]
        assert any(_ngram_in_text(entry, text) for text in sources)


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_text_prints_probabilities_and_labels(predictors, multilabel_run, capsys):
    text = "You stupid idiot moron."
    assert main(["predict", str(multilabel_run), "--text", text]) == 0
    out = capsys.readouterr().out
    predictor = predictors["multilabel"]
    labels = np.asarray(predictor.label_names)[predictor.predict([{"comment_text": text}])[0] == 1]
    assert f"labels: {', '.join(labels) or 'none'}" in out
    proba = predictor.predict_proba([{"comment_text": text}])[0]
    for name, p in zip(predictor.label_names, proba):
        assert re.search(rf"^{name}\s+{p:.4f}", out, re.MULTILINE)


def test_cli_text_explain_prints_stack_shares_and_ngrams(multilabel_run, capsys):
    assert main(["predict", str(multilabel_run), "--text", "You stupid idiot moron.",
                 "--explain"]) == 0
    out = capsys.readouterr().out
    assert "why:" in out and "stack " in out and "tfidf_logreg:" in out
    assert "'idiot'" in out or "'stupid'" in out


def test_cli_pair_reads_three_files(predictors, pairwise_run, tmp_path, capsys):
    row = read_test_csv(pairwise_run).iloc[0]
    paths = []
    for column in ("prompt", "response_a", "response_b"):
        path = tmp_path / f"{column}.txt"
        path.write_text(json.loads(row[column])[0])
        paths.append(str(path))
    assert main(["predict", str(pairwise_run), "--pair", *paths]) == 0
    one_turn = {c: [Path(p).read_text()] for c, p in zip(("prompt", "response_a", "response_b"), paths)}
    (label,) = predictors["pairwise"].predict([one_turn])
    assert f"labels: {label}" in capsys.readouterr().out


def test_cli_batch_in_chunks_equals_one_call_and_keeps_empty_text(predictors, multilabel_run,
                                                                  tmp_path, capsys):
    test = read_test_csv(multilabel_run)
    test.loc[3, "comment_text"] = ""  # kept and counted, as in training data
    source = tmp_path / "in.csv"
    test.to_csv(source, index=False)
    output = tmp_path / "out.csv"
    args = ["predict", str(multilabel_run), "--input", str(source), "--output", str(output)]
    assert main([*args, "--chunk-rows", "7"]) == 0
    out = capsys.readouterr().out
    assert f"predicted {len(test)} rows" in out and "(1 with empty text" in out
    written = pd.read_csv(output, dtype={"id": str})
    predictor = predictors["multilabel"]
    assert list(written["id"]) == list(test["id"])
    np.testing.assert_allclose(written[predictor.label_names], predictor.predict_proba(test),
                               atol=ATOL)
    np.testing.assert_array_equal(written[[f"pred_{n}" for n in predictor.label_names]],
                                  predictor.predict(test))


def test_cli_batch_without_id_column_numbers_rows_across_chunks(tmp_path):
    run_dir = tfidf_only(tmp_path, ["tfidf", "stack"])
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    read_test_csv(run_dir).drop(columns="id").to_csv(source, index=False)
    assert main(["predict", str(run_dir), "--input", str(source), "--output", str(output),
                 "--chunk-rows", "6"]) == 0
    written = pd.read_csv(output, dtype={"id": str})
    assert list(written["id"]) == [str(i) for i in range(20)]
    names = list(read_json(run_dir / "dataset.json")["label_names"])
    assert set(written["pred_label"]) <= set(names)
    np.testing.assert_array_equal(written["pred_label"],
                                  np.asarray(names)[written[names].to_numpy().argmax(axis=1)])


# -- bad input -----------------------------------------------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_experiment_without_a_stack_is_one_error_line(tmp_path, capsys):
    run_dir = tfidf_only(tmp_path, ["tfidf"])
    with pytest.raises(HybridstackError, match=r"run `hybridstack run stack -c .*config.toml` first"):
        hybridstack.load(run_dir)
    assert main(["predict", str(run_dir), "--text", "a match and a goal"]) == 2
    assert "no finished stack" in _error_line(capsys)


def test_missing_fold_model_is_one_error_line(tmp_path):
    run_dir = tfidf_only(tmp_path, ["tfidf", "stack"])
    (run_dir / "models" / "lr_b" / "fold_1" / "model.joblib").unlink()
    with pytest.raises(HybridstackError, match=r"models/lr_b: fold_1/model.joblib is missing"):
        hybridstack.load(run_dir)


def test_base_model_refitted_after_the_stack_is_refused(tmp_path):
    run_dir = tfidf_only(tmp_path, ["tfidf", "stack"])
    (run_dir / "models" / "lr_a" / "DONE").write_text("another-hash\n")
    with pytest.raises(HybridstackError, match="refitted after the stack"):
        hybridstack.load(run_dir)


def test_rows_missing_a_text_column_are_one_error_line(predictors):
    with pytest.raises(HybridstackError, match="missing column.*'comment_text'"):
        predictors["multilabel"].predict_proba([{"text": "hello"}])
    with pytest.raises(HybridstackError, match="no rows"):
        predictors["multilabel"].predict_proba([])


@pytest.mark.parametrize("argv, message", [
    (["--text", "   "], "--text is empty"),
    (["--pair", "p.txt", "a.txt", "b.txt"], "--pair is for pairwise experiments"),
    (["--input", "in.csv"], "--input needs --output"),
    (["--input", "no_such.csv", "--output", "o.csv"], "--input: file not found"),
    (["--text", "hi", "--output", "o.csv"], "--output goes with --input"),
])
def test_cli_bad_arguments_are_one_error_line(multilabel_run, capsys, argv, message):
    assert main(["predict", str(multilabel_run), *argv]) == 2
    assert message in _error_line(capsys)


def test_cli_text_on_a_pairwise_experiment_asks_for_pair(pairwise_run, capsys):
    assert main(["predict", str(pairwise_run), "--text", "which answer wins?"]) == 2
    assert "--pair PROMPT A B" in _error_line(capsys)


def test_not_an_experiment_folder_is_one_error_line(tmp_path):
    with pytest.raises(HybridstackError, match="not an experiment folder"):
        hybridstack.load(tmp_path)


def test_moved_run_folder_still_predicts(tmp_path):
    run_dir = tfidf_only(tmp_path / "a", ["tfidf", "stack"])
    moved = tmp_path / "b" / "runs" / run_dir.name
    shutil.copytree(run_dir, moved)
    test = read_test_csv(run_dir)
    np.testing.assert_allclose(hybridstack.load(moved).predict_proba(test),
                               np.load(moved / "stack" / "test.npy"), atol=ATOL)


def test_import_hybridstack_stays_light():
    import subprocess

    code = ("import sys, hybridstack, hybridstack.predict, hybridstack.commands.predict; "
            "print(sorted({'torch', 'lightgbm', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
