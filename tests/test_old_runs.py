"""A run folder written by the code before the layout change (tests/data/run_before_layout,
made by hybridstack at commit bc21818) still skips, predicts, and fails in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hybridstack
from hybridstack.cli import main
from hybridstack.errors import HybridstackError

OLD = Path(__file__).resolve().parent / "data" / "run_before_layout"


@pytest.fixture
def old_run(tmp_path) -> Path:
    shutil.copytree(OLD, tmp_path / "old")
    return tmp_path / "old"


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_old_run_is_not_refitted(old_run, capsys):
    before = digest(old_run / "runs")
    assert main(["run", "tfidf", "-c", str(old_run / "old.toml")]) == 0
    assert main(["run", "stack", "-c", str(old_run / "old.toml")]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("DONE with the same config, skipped") == 2
    changed = {k for k, v in digest(old_run / "runs").items() if before.get(k) != v}
    # only the submission is rewritten (same bytes would be fine too); no model file changes
    assert not {k for k in changed if "/models/" in k or "/stack/" in k}, changed


def test_old_run_predicts_its_own_test_outputs(old_run):
    predictor = hybridstack.load(old_run / "runs" / "old")
    test = pd.read_csv(old_run / "data" / "test.csv", dtype=str, keep_default_na=False)
    np.testing.assert_allclose(predictor.predict_proba(test),
                               np.load(old_run / "runs" / "old" / "stack" / "test.npy"), atol=1e-6)


def test_unreadable_old_model_folder_is_one_error_line(old_run):
    (old_run / "runs" / "old" / "models" / "tfidf_logreg" / "vectorizer.joblib").unlink()
    with pytest.raises(HybridstackError, match="vectorizer.joblib is missing") as err:
        hybridstack.load(old_run / "runs" / "old")
    assert "\n" not in str(err.value)
    config = old_run / "runs" / "old" / "models" / "tfidf_logreg" / "config.json"
    record = json.loads(config.read_text())
    config.write_text(json.dumps({**record, "stage": None}))
    with pytest.raises(HybridstackError, match="older hybridstack") as err:
        hybridstack.load(old_run / "runs" / "old")
    assert "\n" not in str(err.value)
