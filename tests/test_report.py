"""The report renders: markdown leaderboard, blend and thresholds, valid PNG plots, CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hybridstack.cli import main
from hybridstack.commands.report import write_report
from hybridstack.errors import HybridstackError
from hybridstack.runs import ExperimentDir
from hybridstack.stages import stack, tfidf

TWO_MODELS = {"models": [{"name": "a", "C": 4.0}, {"name": "b", "C": 0.5}]}


def assert_png(path, min_side: int = 200) -> None:
    with Image.open(path) as image:
        image.verify()  # raises on a truncated or malformed file
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # something was drawn, not a blank canvas


def test_multilabel_report_with_stack(make_config):
    cfg, _ = make_config("multilabel", n_train=150, tfidf=TWO_MODELS,
                         stack={"enabled": True, "methods": ["weighted"]})
    tfidf.run(cfg)
    stack.run(cfg)
    path = write_report(cfg.run_dir)
    exp_dir = ExperimentDir(cfg.run_dir)
    assert path == exp_dir.report_dir / "report.md"
    for name in ("roc.png", "calibration.png", "scores.png"):
        assert_png(exp_dir.report_dir / name)
    assert not (exp_dir.report_dir / "confusion.png").exists()

    text = path.read_text()
    for name in ("a", "b"):
        overall = exp_dir.model(name).load_scores()["overall"]
        assert f"| {name} | {overall:.5f} |" in text
    stack_scores = exp_dir.stack.load_scores()
    assert f"| stack (final) | {stack_scores['overall']:.5f} |" in text
    assert f"Chosen: **{stack_scores['chosen']}**" in text
    assert "### Blend weights" in text and "### Decision thresholds" in text
    for label in cfg.task.label_columns:  # one threshold row (precision/recall/F1) per label
        assert any(line.startswith(f"| {label} | ") for line in text.splitlines())
    assert "![roc](roc.png)" in text


def test_multiclass_report_without_stack_uses_the_best_model(make_config):
    cfg, _ = make_config("multiclass", tfidf=TWO_MODELS)
    tfidf.run(cfg)
    path = write_report(cfg.run_dir)
    exp_dir = ExperimentDir(cfg.run_dir)
    assert_png(exp_dir.report_dir / "confusion.png")
    assert_png(exp_dir.report_dir / "calibration.png")
    assert not (exp_dir.report_dir / "roc.png").exists()
    text = path.read_text()
    best = min(("a", "b"), key=lambda n: exp_dir.model(n).load_scores()["overall"])  # log loss
    assert f"| {best} (final) |" in text and "## Stack" not in text
    # the leaderboard is ranked best first
    rows = [line for line in text.splitlines() if line.startswith(("| a", "| b"))]
    assert rows[0].startswith(f"| {best}")


def test_cli_report_command(make_config, capsys):
    cfg, _ = make_config("multiclass")
    tfidf.run(cfg)
    assert main(["report", str(cfg.run_dir)]) == 0
    assert (cfg.run_dir / "report" / "report.md").is_file()
    assert main(["report", str(cfg.run_dir.parent / "missing")]) == 2
    assert "not an experiment folder" in capsys.readouterr().err


def test_report_without_finished_models_is_an_error(make_config):
    cfg, _ = make_config("multiclass", tfidf={"enabled": True, "models": []})
    tfidf.run(cfg)
    with pytest.raises(HybridstackError, match="no finished model"):
        write_report(cfg.run_dir)
