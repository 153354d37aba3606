"""Shared fixtures: tiny synthetic competitions written to tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import tomli_w

from hybridstack.config import Config, config_from_dict
from hybridstack.synthetic import write_competition

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fast defaults for tests: small folds and vectorizers, later stages off unless a test enables them.
FAST = {
    "cv": {"n_splits": 3},
    "tfidf": {"max_word_features": 2000, "max_char_features": 4000, "min_df": 1},
    "embed": {"enabled": False},
    "finetune": {"enabled": False},
    "stack": {"enabled": False},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path: Path, monkeypatch):
    """Commands that write to the current folder (predict's ./hybridstack-cache) write there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box they spin-wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_config(tmp_path: Path):
    """``make_config(kind, n_train=120, n_test=40, **sections)`` -> (Config, path to its TOML)."""

    def factory(kind: str, n_train: int = 120, n_test: int = 40, seed: int = 0,
                **sections) -> tuple[Config, Path]:
        data_dir = tmp_path / f"data_{kind}"
        raw = write_competition(data_dir, kind, n_train, n_test, seed=seed)
        raw = _merge(_merge(FAST, raw), sections)
        raw.setdefault("experiment", f"exp_{kind}")
        raw["workdir"] = str(tmp_path / "work")
        path = tmp_path / f"{raw['experiment']}.toml"
        path.write_text(tomli_w.dumps(raw))
        return config_from_dict(raw), path

    return factory


@pytest.fixture
def killed_after_first_epoch(monkeypatch):
    """``killed_after_first_epoch(cfg)``: run the finetune stage on ``cfg`` and kill it
    (KeyboardInterrupt) right after epoch 1's resume checkpoint is written."""
    from hybridstack.finetune import loop
    from hybridstack.stages import finetune as stage

    def run_and_kill(cfg) -> None:
        real_save = loop.FoldCheckpoints.save_last

        def save_then_die(self, state):
            real_save(self, state)
            if state.epoch == 1:
                raise KeyboardInterrupt

        monkeypatch.setattr(loop.FoldCheckpoints, "save_last", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            stage.run(cfg)
        monkeypatch.undo()

    return run_and_kill


@pytest.fixture
def append_swapped_test_rows():
    """``append_swapped_test_rows(cfg)``: a pairwise experiment's test and sample files gain
    each test row again with responses A and B exchanged (ids + 100000), for swap-TTA checks."""

    def append(cfg) -> None:
        test = pd.read_csv(cfg.data.test)
        twin = test.rename(columns={"response_a": "response_b", "response_b": "response_a"})
        twin["id"] = twin["id"] + 100_000
        pd.concat([test, twin[test.columns]]).to_csv(cfg.data.test, index=False)
        sample = pd.read_csv(cfg.data.sample_submission)
        pd.concat([sample, sample.assign(id=sample["id"] + 100_000)]).to_csv(
            cfg.data.sample_submission, index=False)

    return append
