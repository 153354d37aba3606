"""Packaged recipes: `init --recipe` on Kaggle-shaped folders is exactly configs/*.toml, the
recipes hold the seed settings, `init --gpu` uses them, and the submission lands where
Kaggle reads it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pandas as pd
import pytest

from hybridstack.cli import main
from hybridstack.config import load_config
from hybridstack.recipes import RECIPES, load_recipe
from hybridstack.synthetic import write_competition, write_kaggle_competition

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def kaggle_root(tmp_path, monkeypatch) -> Path:
    """``<tmp>/kaggle`` standing in for /kaggle: input/ (the input root) and working/."""
    root = tmp_path / "kaggle"
    (root / "working").mkdir(parents=True)
    monkeypatch.setenv("HYBRIDSTACK_INPUT_ROOT", str(root / "input"))
    return root


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_init_recipe_on_kaggle_folder_is_the_shipped_config(kaggle_root, recipe):
    folder = write_kaggle_competition(kaggle_root / "input", recipe)
    out = kaggle_root / "working" / f"{recipe}.toml"
    assert main(["init", str(folder), "--recipe", recipe, "-o", str(out)]) == 0
    written = out.read_text().replace(str(kaggle_root), "/kaggle")
    assert written == (CONFIGS / f"{recipe}.toml").read_text(), (
        "configs/ is out of date: python scripts/write_configs.py")
    cfg = load_config(out)
    assert cfg.workdir == kaggle_root / "working"
    assert cfg.submission == kaggle_root / "working" / "submission.csv"


def test_lmsys_recipe_holds_the_seed_settings():
    ft = load_recipe("lmsys").sections["finetune"]
    assert ft["model"] == "microsoft/deberta-v3-small" and ft["max_length"] == 512
    assert ft["segment_budget"] == [0.2, 0.4, 0.4] and ft["head_fraction"] == 0.5
    assert (ft["batch_size"], ft["lr"], ft["scheduler"], ft["warmup_ratio"]) == (8, 1.2e-5, "cosine", 0.06)
    assert (ft["label_smoothing"], ft["weight_decay"], ft["dropout"]) == (0.08, 0.03, 0.2)
    assert "attention_dropout" not in ft  # the checkpoint's
    assert (ft["epochs"], ft["patience"], ft["seed"], ft["folds"]) == (5, 2, 42, [0])
    assert load_recipe("lmsys").sections["tfidf"]["models"] == [{"name": "tfidf_logreg", "C": 0.25}]


def test_jigsaw_recipe_holds_the_cleanspeech_settings():
    sections = load_recipe("jigsaw").sections
    ft = sections["finetune"]
    assert ft["model"] == "microsoft/mdeberta-v3-base" and ft["max_length"] == 256
    assert ft["class_weighted_bce"] is True and (ft["lr"], ft["weight_decay"]) == (2e-5, 0.01)
    assert (ft["scheduler"], ft["warmup_ratio"], ft["batch_size"]) == ("linear", 0.1, 16)
    assert (ft["epochs"], ft["patience"], ft["max_grad_norm"], ft["folds"]) == (6, 2, 1.0, [0])
    assert sections["data"]["clean"] == {"lowercase": True, "remove_urls": True,
                                         "remove_non_ascii": True, "normalize_whitespace": True}


def test_recipe_configs_read_jigsaw_zips(kaggle_root):
    folder = write_kaggle_competition(kaggle_root / "input", "jigsaw", n_train=30, n_test=8)
    out = kaggle_root / "working" / "jigsaw.toml"
    assert main(["init", str(folder), "--recipe", "jigsaw", "-o", str(out)]) == 0
    assert load_config(out).data.train.name == "train.csv.zip"
    from hybridstack.experiment import open_experiment

    exp = open_experiment(load_config(out))
    assert len(exp.train) == 30 and len(exp.test) == 8


@pytest.mark.parametrize(("kind", "max_length", "lr"), [("pairwise", 512, 1.2e-5),
                                                        ("multilabel", 256, 2e-5),
                                                        ("multiclass", 256, 1.2e-5)])
def test_init_gpu_without_recipe_uses_the_recipe_of_the_kind(tmp_path, kind, max_length, lr):
    write_competition(tmp_path / "comp", kind, 30, 10)
    out = tmp_path / "cfg.toml"
    assert main(["init", str(tmp_path / "comp"), "--gpu", "-o", str(out)]) == 0
    ft = tomllib.loads(out.read_text())["finetune"]
    assert (ft["max_length"], ft["lr"], ft["folds"]) == (max_length, lr, [0])
    if kind == "multiclass":
        assert ft["label_smoothing"] == 0.08 and "segment_budget" not in ft


def test_outside_the_input_root_no_kaggle_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSTACK_INPUT_ROOT", str(tmp_path / "elsewhere"))
    write_competition(tmp_path / "comp", "pairwise", 30, 10)
    out = tmp_path / "cfg.toml"
    assert main(["init", str(tmp_path / "comp"), "--recipe", "lmsys", "-o", str(out)]) == 0
    raw = tomllib.loads(out.read_text())
    assert "submission" not in raw and "workdir" not in raw
    assert raw["finetune"]["lr"] == 1.2e-5


def test_recipe_of_another_kind_is_one_error_line(tmp_path, capsys):
    write_competition(tmp_path / "comp", "multiclass", 30, 10)
    code = main(["init", str(tmp_path / "comp"), "--recipe", "lmsys", "-o", str(tmp_path / "c.toml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "prompt" in err
    assert not (tmp_path / "c.toml").exists()


def test_submission_is_copied_where_the_config_says(make_config):
    cfg, path = make_config("multiclass", n_train=60, n_test=15)
    assert main(["run", "tfidf", "-c", str(path), "--set", 'submission="kaggle/submission.csv"']) == 0
    copy = cfg.workdir / "kaggle" / "submission.csv"
    own = cfg.run_dir / "submission.csv"
    assert copy.read_bytes() == own.read_bytes()
    assert len(pd.read_csv(copy)) == 15


def _rehearsal():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "kaggle_rehearsal.py"
    spec = importlib.util.spec_from_file_location("kaggle_rehearsal", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rehearsal_runs_the_readme_block_with_the_documented_overrides(tmp_path):
    rehearsal = _rehearsal()
    script = rehearsal.notebook_block(tmp_path / "kaggle")
    assert "/kaggle/" not in script.replace(str(tmp_path / "kaggle"), "")
    run_lines = [line for line in script.splitlines() if line.startswith("hybridstack run ")]
    assert run_lines and all(line.endswith(" ".join(rehearsal.CPU_OVERRIDES)) for line in run_lines)
    assert any("--recipe lmsys" in line for line in script.splitlines())
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"`{' '.join(rehearsal.CPU_OVERRIDES)}`" in readme  # documented next to the block
    inference = rehearsal.notebook_block(tmp_path / "kaggle", "inference").splitlines()
    predict = [line for line in inference if line.startswith("hybridstack predict ")]
    assert len(predict) == 1 and "--submission" in predict[0] and predict[0].endswith("--cpu")
    assert f"{tmp_path / 'kaggle'}/input/{rehearsal.TRAINING_OUTPUT}/runs/lmsys" in predict[0]
