"""Model lookup under the Kaggle input root (a fake root in tmp_path via HYBRIDSTACK_INPUT_ROOT)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from hybridstack import models
from hybridstack.errors import HybridstackError

MODEL_ID = "microsoft/deberta-v3-small"


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "input"
    root.mkdir()
    monkeypatch.setenv(models.INPUT_ROOT_ENV, str(root))
    monkeypatch.setattr(models, "_hf_cache_path", lambda model_id: None)  # this machine's cache
    monkeypatch.chdir(tmp_path)  # no ./microsoft/deberta-v3-small here
    return root


def _model(folder: Path, marker: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / marker).write_text("{}")
    return folder


def test_input_root_follows_the_env_var_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv(models.INPUT_ROOT_ENV, raising=False)
    assert models.input_root() == Path("/kaggle/input")
    assert models.kaggle_working_dir() == Path("/kaggle/working")
    monkeypatch.setenv(models.INPUT_ROOT_ENV, str(tmp_path / "in"))
    assert models.input_root() == tmp_path / "in"
    assert models.kaggle_working_dir() == tmp_path / "working"


def test_is_under_input_root_uses_resolved_paths(root, tmp_path):
    (root / "data").mkdir()
    (tmp_path / "link").symlink_to(root / "data")
    assert models.is_under_input_root(root / "data" / "train.csv")
    assert models.is_under_input_root(tmp_path / "link" / "train.csv")
    assert not models.is_under_input_root(root / ".." / "working" / "x")
    assert not models.is_under_input_root(tmp_path / "input-other")


def test_kaggle_models_layout_is_found(root):
    folder = _model(root / "deberta-v3-small" / "transformers" / "default" / "1")
    assert models.find_model(MODEL_ID) == folder
    assert models.resolve_model(MODEL_ID, "finetune.model") == folder


def test_the_highest_version_is_chosen_and_logged(root, caplog):
    _model(root / "deberta-v3-small" / "transformers" / "default" / "1")
    newest = _model(root / "deberta-v3-small" / "transformers" / "default" / "2")
    _model(root / "Deberta-V3-Small" / "pytorch" / "default" / "10" / "x", "modules.json")
    with caplog.at_level(logging.INFO, logger="hybridstack.models"):
        found = models.find_model(MODEL_ID)
    assert found == root / "Deberta-V3-Small" / "pytorch" / "default" / "10" / "x"
    assert "3 candidate folders" in caplog.text and str(found) in caplog.text
    (found / "modules.json").unlink()  # no longer a model folder
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hybridstack.models"):
        assert models.find_model(MODEL_ID) == newest
    assert f"using {newest} (2 candidate folders" in caplog.text


def test_versioned_beats_unversioned_then_shortest_then_alphabetical(root):
    shallow = _model(root / "b" / "deberta-v3-small")
    _model(root / "a" / "x" / "deberta-v3-small")
    assert models.find_model(MODEL_ID) == shallow
    first = _model(root / "a" / "deberta-v3-small")
    assert models.find_model(MODEL_ID) == first
    versioned = _model(root / "deberta-v3-small" / "transformers" / "default" / "1")
    assert models.find_model(MODEL_ID) == versioned


def test_dataset_layout_is_found(root):
    folder = _model(root / "my-models" / "deberta-v3-small")
    (folder / "1_Pooling").mkdir()
    _model(folder / "1_Pooling")  # a sub-module's config: never descended into
    assert models.find_model(MODEL_ID) == folder


def test_a_folder_six_levels_deep_is_not_found(root):
    _model(root / "a" / "b" / "c" / "d" / "e" / "deberta-v3-small")
    assert models.find_model(MODEL_ID) is None
    five = _model(root / "a" / "b" / "c" / "d" / "deberta-v3-small")
    assert models.find_model(MODEL_ID) == five


def test_a_non_model_folder_with_the_right_name_is_not_taken(root):
    (root / "deberta-v3-small").mkdir()
    (root / "deberta-v3-small" / "README.md").write_text("weights elsewhere")
    _model(root / "other-model" / "transformers" / "default" / "3")  # a model, but another one
    assert models.find_model(MODEL_ID) is None


def test_symlink_loops_end(root):
    folder = _model(root / "ds" / "deberta-v3-small")
    os.symlink(root / "ds", root / "ds" / "loop")
    os.symlink(root, root / "ds" / "up")
    assert models.find_model(MODEL_ID) == folder


def test_the_error_names_hf_download_and_the_root(root):
    with pytest.raises(HybridstackError) as err:
        models.resolve_model(MODEL_ID, "finetune.model")
    message = str(err.value)
    assert "\n" not in message
    assert f"`hf download {MODEL_ID}`" in message and "huggingface-cli" not in message
    assert f"{root} up to 5 levels" in message
    assert f"{root}/deberta-v3-small/transformers/default/1" in message


def test_explicit_and_embedded_names_are_unchanged(root, tmp_path):
    folder = _model(tmp_path / "mine")
    assert models.find_model(str(folder)) == folder
    assert models.find_model(str(tmp_path / "missing")) is None
    assert models.find_model(models.EMBEDDED_MINILM) == models.embedded_minilm_path()
