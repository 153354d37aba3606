"""hybridstack init: detection per layout, flags, ambiguity errors, and a config that runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pandas as pd
import pytest

from hybridstack.cli import build_parser, main
from hybridstack.commands import init as scaffold
from hybridstack.config import JIGSAW_LABELS, PAIRWISE_LABELS, load_config
from hybridstack.errors import HybridstackError
from hybridstack.synthetic import multiclass_frame, write_competition


def _init(tmp_path: Path, folder: Path, *flags: str, output: str = "cfg.toml") -> dict:
    """Run ``hybridstack init`` (CPU recipe unless flags say otherwise); return the written TOML."""
    out = tmp_path / output
    assert main(["init", str(folder), "-o", str(out), *flags]) == 0
    return tomllib.loads(out.read_text())


def _init_error(tmp_path: Path, folder: Path, *flags: str) -> str:
    """The one-line error ``hybridstack init`` raises for these flags; nothing is written."""
    args = build_parser().parse_args(["init", str(folder), "-o", str(tmp_path / "err.toml"), *flags])
    with pytest.raises(HybridstackError) as err:
        args.func(args)
    message = str(err.value)
    assert "\n" not in message
    assert not (tmp_path / "err.toml").exists()
    return message


@pytest.fixture
def no_reference_models(monkeypatch):
    """Detection tests must not depend on what this machine has in its HF cache."""
    real = scaffold.find_model
    monkeypatch.setattr(scaffold, "find_model", lambda name: real(name) if name.startswith("embedded:") else None)


# -- detection of the three layouts ---------------------------------------------------------


def test_lmsys_layout_is_pairwise(tmp_path, no_reference_models, capsys):
    write_competition(tmp_path / "lmsys", "pairwise", 30, 10)
    raw = _init(tmp_path, tmp_path / "lmsys", "--no-gpu")
    assert raw["task"] == {"kind": "pairwise", "id_column": "id", "prompt_column": "prompt",
                           "response_columns": ["response_a", "response_b"],
                           "winner_columns": PAIRWISE_LABELS}
    assert "kind pairwise (LMSYS layout" in capsys.readouterr().out
    assert load_config(tmp_path / "cfg.toml").task.kind == "pairwise"


def test_jigsaw_layout_is_multilabel(tmp_path, no_reference_models):
    write_competition(tmp_path / "jigsaw", "multilabel", 30, 10)
    raw = _init(tmp_path, tmp_path / "jigsaw", "--no-gpu")
    assert raw["task"] == {"kind": "multilabel", "id_column": "id", "text_columns": ["comment_text"],
                           "label_columns": JIGSAW_LABELS}
    assert load_config(tmp_path / "cfg.toml").task.label_columns == JIGSAW_LABELS


def test_tfidf_extras_follow_the_cv_measurements(tmp_path, no_reference_models, capsys):
    """NB-SVM, shape features and a class-balanced logistic regression are added where they
    raised the stack's CV (Jigsaw-shaped multilabel), not elsewhere."""
    write_competition(tmp_path / "jigsaw", "multilabel", 30, 10)
    raw = _init(tmp_path, tmp_path / "jigsaw", "--no-gpu")
    assert raw["tfidf"]["nbsvm"] == [{"name": "tfidf_nbsvm"}]
    assert "NB-SVM" in capsys.readouterr().out
    multilabel = load_config(tmp_path / "cfg.toml").tfidf
    assert [m.name for m in multilabel.nbsvm] == ["tfidf_nbsvm"]
    assert multilabel.shape_features
    assert [(m.name, m.C, m.class_weight) for m in multilabel.models] == [
        ("tfidf_logreg", 4.0, None), ("tfidf_logreg_balanced", 4.0, "balanced")]
    for kind in ("multiclass", "pairwise"):
        write_competition(tmp_path / kind, kind, 30, 10)
        raw = _init(tmp_path, tmp_path / kind, "--no-gpu", output=f"{kind}.toml")
        assert "nbsvm" not in raw["tfidf"]
        assert not load_config(tmp_path / f"{kind}.toml").tfidf.shape_features
    # pairwise: the calibrated C that won on llmeval2-pairwise's CV; multiclass keeps C = 4
    assert [(m.name, m.C) for m in load_config(tmp_path / "pairwise.toml").tfidf.models] == [
        ("tfidf_logreg", 0.25)]
    assert [m.C for m in load_config(tmp_path / "multiclass.toml").tfidf.models] == [4.0]


def test_generic_csv_is_multiclass(tmp_path, no_reference_models):
    write_competition(tmp_path / "news", "multiclass", 30, 10)
    raw = _init(tmp_path, tmp_path / "news", "--no-gpu")
    assert raw["task"] == {"kind": "multiclass", "id_column": "id", "text_columns": ["text"],
                           "label_column": "label"}


def test_unnamed_columns_use_length_and_distinct_values(tmp_path, no_reference_models):
    frame = multiclass_frame(40).rename(columns={"text": "passage", "label": "grade"})
    frame["author"] = [f"user{i % 35}" for i in range(40)]  # short, many values: neither role
    folder = tmp_path / "plain"
    folder.mkdir()
    frame.to_csv(folder / "train.csv", index=False)  # no test file: labels cannot be read off it
    raw = _init(tmp_path, folder, "--no-gpu")
    assert raw["task"]["text_columns"] == ["passage"]
    assert raw["task"]["label_column"] == "grade"


def test_headerless_tsv_with_flags_runs(tmp_path, no_reference_models):
    folder = tmp_path / "tsv"
    folder.mkdir()
    frame = multiclass_frame(60)
    frame.iloc[:45].to_csv(folder / "train.tsv", sep="\t", index=False, header=False)
    frame.iloc[45:][["id", "text"]].to_csv(folder / "test.tsv", sep="\t", index=False, header=False)
    raw = _init(tmp_path, folder, "--no-gpu", "--kind", "multiclass", "--no-header",
                "--columns", "id,text,label", "--text-column", "text", "--label-column", "label")
    assert raw["data"]["column_names"] == ["id", "text", "label"]
    assert raw["data"]["test"] == "tsv/test.tsv"
    assert raw["task"]["label_column"] == "label"
    assert main(["run", "tfidf", "-c", str(tmp_path / "cfg.toml"), "--set", "cv.n_splits=3",
                 "--set", "tfidf.min_df=1"]) == 0
    submission = pd.read_csv(tmp_path / "runs" / "tsv" / "submission.csv")
    assert submission["id"].tolist() == frame["id"].iloc[45:].tolist()


# -- ambiguity and bad input ----------------------------------------------------------------


def test_headerless_file_without_flags_is_an_error(tmp_path):
    folder = tmp_path / "tsv"
    folder.mkdir()
    multiclass_frame(30).to_csv(folder / "train.tsv", sep="\t", index=False, header=False)
    assert "--no-header --columns" in _init_error(tmp_path, folder)


def _generic(tmp_path: Path, frame: pd.DataFrame) -> Path:
    folder = tmp_path / "generic"
    folder.mkdir()
    frame.to_csv(folder / "train.csv", index=False)
    return folder


def test_two_label_candidates_name_the_flag(tmp_path):
    frame = multiclass_frame(30).assign(target=lambda f: f["label"])
    assert "several candidate label columns (label, target); pass --label-column" in _init_error(
        tmp_path, _generic(tmp_path, frame))


def test_two_text_candidates_name_the_flag(tmp_path):
    frame = multiclass_frame(30).assign(review=lambda f: f["text"])
    assert "pass --text-column" in _init_error(tmp_path, _generic(tmp_path, frame))


def test_missing_id_names_the_flag(tmp_path):
    frame = multiclass_frame(30).drop(columns="id")
    assert "pass --id-column" in _init_error(tmp_path, _generic(tmp_path, frame))


def test_unknown_flag_column_and_lonely_no_header(tmp_path):
    folder = _generic(tmp_path, multiclass_frame(30))
    assert "no column(s) 'body'" in _init_error(tmp_path, folder, "--text-column", "body")
    assert "--no-header and --columns go together" in _init_error(tmp_path, folder, "--no-header")
    assert "3 fields per row but --columns names 2" in _init_error(
        tmp_path, folder, "--no-header", "--columns", "id,text", "--kind", "multiclass")


def test_existing_output_needs_force(tmp_path, no_reference_models):
    write_competition(tmp_path / "news", "multiclass", 30, 10)
    out = tmp_path / "cfg.toml"
    out.write_text("keep me")
    assert main(["init", str(tmp_path / "news"), "-o", str(out)]) == 2
    assert out.read_text() == "keep me"
    assert main(["init", str(tmp_path / "news"), "-o", str(out), "--force", "--no-gpu"]) == 0
    assert load_config(out).task.kind == "multiclass"


# -- paths, models, recipe ------------------------------------------------------------------


def test_paths_relative_below_the_config_and_absolute_elsewhere(tmp_path, no_reference_models):
    write_competition(tmp_path / "comp", "multiclass", 30, 10)
    below = _init(tmp_path, tmp_path / "comp", "--no-gpu")
    assert below["data"] == {"train": "comp/train.csv", "test": "comp/test.csv",
                             "sample_submission": "comp/sample_submission.csv"}
    (tmp_path / "elsewhere").mkdir()
    apart = _init(tmp_path, tmp_path / "comp", "--no-gpu", output="elsewhere/cfg.toml")
    assert apart["data"]["train"] == str((tmp_path / "comp" / "train.csv").resolve())


def test_models_fall_back_to_embedded_with_cpu_recipe(tmp_path, no_reference_models, capsys):
    write_competition(tmp_path / "jigsaw", "multilabel", 30, 10)
    raw = _init(tmp_path, tmp_path / "jigsaw", "--no-gpu")
    assert raw["embed"] == {"model": "embedded:minilm", "prefix": "", "max_seq_length": 256}
    # multilabel trains longer on more rows (it raised the Jigsaw stack's CV)
    assert raw["finetune"] == {"model": "embedded:minilm", **scaffold.CPU_FINETUNE,
                               "epochs": 2, "max_train_rows": 6000}
    # every fold, so the stacker weighs the fine-tune on all rows (it raised both stacks' CV)
    assert load_config(tmp_path / "cfg.toml").finetune.folds is None
    out = capsys.readouterr().out
    assert "intfloat/e5-small-v2 is not available offline" in out
    assert "no GPU -> sized to finish in minutes" in out
    assert "epochs=2, max_train_rows=6000" in out
    for kind in ("multiclass", "pairwise"):  # not measured there: the one-epoch recipe
        write_competition(tmp_path / kind, kind, 30, 10)
        raw = _init(tmp_path, tmp_path / kind, "--no-gpu", output=f"{kind}.toml")
        assert raw["finetune"] == {"model": "embedded:minilm", **scaffold.CPU_FINETUNE}


def test_reference_models_and_gpu_recipe_when_available(tmp_path, monkeypatch):
    monkeypatch.setattr(scaffold, "find_model", lambda name: tmp_path / name)
    write_competition(tmp_path / "jigsaw", "multilabel", 30, 10)
    raw = _init(tmp_path, tmp_path / "jigsaw", "--gpu", "--set", "finetune.epochs=4")
    assert raw["embed"] == {"model": "intfloat/e5-small-v2", "prefix": "query: "}
    assert raw["finetune"]["model"] == "microsoft/mdeberta-v3-base"
    assert raw["finetune"]["max_length"] == 256  # the jigsaw recipe's
    assert raw["finetune"]["epochs"] == 4  # --set wins over the recipe


def test_written_config_runs_tfidf(tmp_path, no_reference_models):
    write_competition(tmp_path / "news", "multiclass", 60, 15)
    _init(tmp_path, tmp_path / "news", "--no-gpu", "--experiment", "news_run")
    code = main(["run", "tfidf", "-c", str(tmp_path / "cfg.toml"), "--set", "cv.n_splits=3",
                 "--set", "tfidf.min_df=1", "--set", "tfidf.max_char_features=4000"])
    assert code == 0
    run_dir = tmp_path / "runs" / "news_run"
    assert (run_dir / "models" / "tfidf_logreg" / "DONE").is_file()
    submission = pd.read_csv(run_dir / "submission.csv")
    assert list(submission.columns) == ["id", "food", "sports", "tech"] and len(submission) == 15


@pytest.mark.slow
@pytest.mark.parametrize(("folder", "kind"), [("llmeval2-pairwise", "pairwise"),
                                              ("jigsaw-toxic-10k", "multilabel"),
                                              ("jigsaw-toxic-kaggle-excerpt", "multilabel")])
def test_real_folders(tmp_path, no_reference_models, folder, kind):
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / folder
    if not data.is_dir():
        pytest.skip("real data not available")
    raw = _init(tmp_path, data, "--no-gpu")
    assert raw["task"]["kind"] == kind
    assert load_config(tmp_path / "cfg.toml").data.train == data / "train.csv"
