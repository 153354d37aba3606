"""Progress of long phases: bars on a terminal, a few log lines in a notebook log, none quiet."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from tqdm.auto import tqdm

from hybridstack import progress as progress_module
from hybridstack.heads.lgbm import LightGBMHead
from hybridstack.heads.mlp import TorchMLPHead
from hybridstack.progress import LogLines, is_quiet, progress, set_quiet


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


@pytest.fixture
def not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.delenv(progress_module.QUIET_ENV, raising=False)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hybridstack.progress"]


def test_a_short_phase_writes_no_line(clock, caplog):
    caplog.set_level(logging.INFO, logger="hybridstack.progress")
    with LogLines(None, 100, "tfidf", "rows") as bar:
        for _ in range(100):
            clock.now += 0.25  # 25 s in all: under FIRST_LINE_S
            bar.update()
    assert messages(caplog) == []


def test_a_long_phase_writes_a_few_lines_not_one_per_step(clock, caplog):
    caplog.set_level(logging.INFO, logger="hybridstack.progress")
    with LogLines(None, 1000, "lightgbm", "rounds") as bar:
        for _ in range(1000):
            clock.now += 0.25  # 250 s: a line at 30 s, then one a minute, then the end
            bar.update()
    assert messages(caplog) == ["lightgbm: running 120/1000 rounds (30s)",
                                "lightgbm: running 360/1000 rounds (90s)",
                                "lightgbm: running 600/1000 rounds (150s)",
                                "lightgbm: running 840/1000 rounds (210s)",
                                "lightgbm: done 1000/1000 rounds (250s)"]


def test_iterating_counts_and_closes(clock, caplog):
    caplog.set_level(logging.INFO, logger="hybridstack.progress")

    def slow_items():
        for i in range(4):
            clock.now += 20
            yield i

    bar = LogLines(slow_items(), 4, "train", "batches")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=f"{1 / (i + 1):.2f}")  # as the fine-tune's epoch bar shows its loss
    assert seen == [0, 1, 2, 3]
    assert messages(caplog) == ["train: running 2/4 batches (40s, loss=0.50)",
                                "train: done 4/4 batches (80s, loss=0.25)"]


def test_a_terminal_gets_a_bar_a_log_file_lines_and_quiet_nothing(monkeypatch):
    monkeypatch.delenv(progress_module.QUIET_ENV, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress(total=3, desc="x")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress(total=3, desc="x"), LogLines)
    set_quiet(True)
    try:
        assert is_quiet() and os.environ[progress_module.QUIET_ENV] == "1"
        quiet_bar = progress(range(3), desc="x")
        assert isinstance(quiet_bar, tqdm) and quiet_bar.disable
        assert list(quiet_bar) == [0, 1, 2]  # still iterates
    finally:
        set_quiet(False)
    assert not is_quiet()


def _xy(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    return X, np.eye(2, dtype=np.float32)[y]


@pytest.mark.parametrize("head", [LightGBMHead(n_estimators=40, early_stopping_rounds=5),
                                  TorchMLPHead(max_epochs=12, patience=3)],
                         ids=["lightgbm", "mlp"])
def test_heads_report_rounds_and_epochs(head, clock, not_a_terminal, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="hybridstack.progress")
    monkeypatch.setattr(progress_module, "FIRST_LINE_S", 0.0)  # every step is "long"
    X, Y = _xy()
    head.fit(X[:200], Y[:200], X[200:], Y[200:])
    lines = messages(caplog)
    desc, unit, total = (("lightgbm", "rounds", 40) if isinstance(head, LightGBMHead)
                         else ("mlp", "epochs", 12))
    assert lines[0] == f"{desc}: running 1/{total} {unit} (0s)"
    assert len(lines) == 2 and lines[1].startswith(f"{desc}: done ")
    steps = int(lines[1].split()[2].split("/")[0])
    assert 1 <= steps <= total
    if unit == "epochs":  # the loop stops early on patience: the count says where
        assert steps == min(total, head.best_iteration_ + 3)


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != progress_module.QUIET_ENV}
    return subprocess.run([sys.executable, "-m", "hybridstack", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_quiet_silences_log_lines_but_not_results(make_config, tmp_path):
    _, path = make_config("multiclass", n_train=60, n_test=20)
    quiet = _run(["--quiet", "run", "tfidf", "-c", str(path)], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert " INFO " not in quiet.stderr
    assert "tfidf_logreg: CV" in quiet.stdout  # the result line still prints
    loud = _run(["run", "tfidf", "-c", str(path), "--set", "tfidf.min_df=2"], tmp_path)
    assert loud.returncode == 0 and " INFO " in loud.stderr


def test_library_bars_are_off_in_a_log_file(not_a_terminal, monkeypatch):
    import huggingface_hub
    import transformers

    from hybridstack.console import setup_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    transformers.utils.logging.enable_progress_bar()
    setup_logging()
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert huggingface_hub.utils.are_progress_bars_disabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
