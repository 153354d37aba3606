"""hybridstack score: known values, -1 rows, class-name labels, and one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hybridstack.cli import main
from hybridstack.commands.score import score_submission
from hybridstack.config import JIGSAW_LABELS, PAIRWISE_LABELS
from hybridstack.errors import HybridstackError


def _write(path: Path, ids, columns: dict) -> Path:
    pd.DataFrame({"id": ids, **columns}).to_csv(path, index=False)
    return path


def _columns(names, matrix_t) -> dict:
    """Column name -> values, from a transposed ``(C, n)`` matrix."""
    return dict(zip(names, matrix_t, strict=True))


def _pairwise_labels(n: int) -> np.ndarray:
    return np.eye(3, dtype=int)[np.arange(n) % 3]


def test_uniform_pairwise_is_ln3_and_perfect_is_near_zero(tmp_path):
    Y = _pairwise_labels(9)
    labels = _write(tmp_path / "labels.csv", range(9), _columns(PAIRWISE_LABELS, Y.T))
    uniform = _write(tmp_path / "uniform.csv", range(9), {c: [1 / 3] * 9 for c in PAIRWISE_LABELS})
    perfect = _write(tmp_path / "perfect.csv", range(9), _columns(PAIRWISE_LABELS, Y.T.astype(float)))

    result = score_submission(uniform, labels)
    assert result.kind == "pairwise" and result.metric_name == "log_loss"
    assert result.value == pytest.approx(math.log(3))
    assert result.n_rows == 9
    assert score_submission(perfect, labels).value < 1e-5


def test_rows_are_joined_by_id_not_position(tmp_path):
    Y = _pairwise_labels(6)
    labels = _write(tmp_path / "labels.csv", ["a", "b", "c", "d", "e", "f"], _columns(PAIRWISE_LABELS, Y.T))
    order = [5, 3, 1, 0, 2, 4]
    shuffled = _write(tmp_path / "sub.csv", [["a", "b", "c", "d", "e", "f"][i] for i in order],
                      _columns(PAIRWISE_LABELS, Y[order].T * 0.8 + 0.2 / 3))
    assert score_submission(shuffled, labels).value == pytest.approx(-math.log(0.8 + 0.2 / 3))


def test_multilabel_skips_minus_one_rows(tmp_path):
    rng = np.random.default_rng(0)
    scored = rng.integers(0, 2, size=(20, 6))
    scored[0], scored[1] = 1, 0  # every column has both classes
    Y = np.vstack([scored, -np.ones((5, 6), dtype=int)])
    # Perfect ranking on the scored rows; the -1 rows get predictions that would ruin it.
    P = np.vstack([scored * 0.9 + 0.05, np.tile([0.0], (5, 6))])
    ids = [f"r{i}" for i in range(25)]
    labels = _write(tmp_path / "labels.csv", ids, _columns(JIGSAW_LABELS, Y.T))
    sub = _write(tmp_path / "sub.csv", ids, _columns(JIGSAW_LABELS, P.T))

    result = score_submission(sub, labels)
    assert result.kind == "multilabel" and result.metric_name == "mean_roc_auc"
    assert result.value == pytest.approx(1.0)
    assert (result.n_rows, result.n_skipped) == (20, 5)
    assert set(result.per_column) == set(JIGSAW_LABELS)


def test_multilabel_minus_one_is_per_column(tmp_path):
    Y = np.array([[1, 0], [0, 1], [1, 1], [0, -1]])
    # Column b: scoring the -1 row (lowest label, highest prediction) would give AUC 0.5.
    P = np.array([[0.9, 0.1], [0.1, 0.8], [0.8, 0.7], [0.2, 0.99]])
    labels = _write(tmp_path / "labels.csv", range(4), {"a": Y[:, 0], "b": Y[:, 1]})
    sub = _write(tmp_path / "sub.csv", range(4), {"a": P[:, 0], "b": P[:, 1]})

    result = score_submission(sub, labels, kind="multilabel")
    assert result.per_column == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert (result.n_rows, result.n_skipped) == (4, 0)


def test_constant_multilabel_prediction_is_half(tmp_path):
    Y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    labels = _write(tmp_path / "labels.csv", range(4), _columns("xyz", Y.T))
    sub = _write(tmp_path / "sub.csv", range(4), {c: [0.5] * 4 for c in "xyz"})
    assert score_submission(sub, labels).value == pytest.approx(0.5)


def test_class_name_labels_match_one_hot_labels(tmp_path):
    classes = ["food", "sports", "tech"]
    names = ["tech", "food", "sports", "tech", "food"]
    P = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
    sub = _write(tmp_path / "sub.csv", range(5), _columns(classes, P.T))
    by_name = _write(tmp_path / "names.csv", range(5), {"label": names})
    one_hot = _write(tmp_path / "onehot.csv", range(5),
                     {c: [int(n == c) for n in names] for c in classes})

    expected = -np.mean(np.log([0.7, 0.6, 0.5, 0.4, 0.5]))
    assert score_submission(sub, by_name).value == pytest.approx(expected)
    result = score_submission(sub, one_hot)
    assert result.kind == "multiclass"
    assert result.value == pytest.approx(expected)


def test_binary_single_column_is_log_loss_of_positive_probability(tmp_path):
    labels = _write(tmp_path / "labels.csv", range(4), {"target": [1, 0, 1, 0]})
    sub = _write(tmp_path / "sub.csv", range(4), {"target": [0.8, 0.2, 0.6, 0.4]})
    assert score_submission(sub, labels).value == pytest.approx(-np.mean(np.log([0.8, 0.8, 0.6, 0.6])))


@pytest.mark.parametrize(
    ("sub_ids", "sub_value", "message"),
    [
        ([0, 1, 2, 7], 0.5, "ids differ: 1 ids"),
        ([0, 1, 2, 2], 0.5, "duplicate ids"),
        ([0, 1, 2, 3], "", "NaN or non-numeric"),
    ],
)
def test_bad_submissions_are_one_line_errors(tmp_path, sub_ids, sub_value, message):
    labels = _write(tmp_path / "labels.csv", range(4), {"x": [1, 0, 1, 0], "y": [0, 0, 1, 1]})
    values = [0.5, 0.5, 0.5, sub_value]
    sub = _write(tmp_path / "sub.csv", sub_ids, {"x": values, "y": values})
    with pytest.raises(HybridstackError, match=message) as err:
        score_submission(sub, labels)
    assert "\n" not in str(err.value)


def test_missing_label_column_is_an_error(tmp_path):
    labels = _write(tmp_path / "labels.csv", range(3), {"x": [1, 0, 1], "y": [0, 1, 1]})
    sub = _write(tmp_path / "sub.csv", range(3), {"x": [0.5] * 3, "z": [0.5] * 3})
    with pytest.raises(HybridstackError, match="no column.*'z'"):
        score_submission(sub, labels)


def test_cli_prints_metric_and_row_count(tmp_path, capsys):
    Y = _pairwise_labels(6)
    labels = _write(tmp_path / "labels.csv", range(6), _columns(PAIRWISE_LABELS, Y.T))
    sub = _write(tmp_path / "sub.csv", range(6), {c: [1 / 3] * 6 for c in PAIRWISE_LABELS})
    assert main(["score", str(sub), str(labels)]) == 0
    out = capsys.readouterr().out
    assert "log_loss = 1.098612" in out and "6 rows scored" in out

    bad = _write(tmp_path / "bad.csv", range(5), {c: [1 / 3] * 5 for c in PAIRWISE_LABELS})
    assert main(["score", str(bad), str(labels)]) == 2
    assert capsys.readouterr().err.startswith("error: ids differ")


@pytest.mark.slow
def test_real_jigsaw_sample_submission_scores_half(capsys):
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "jigsaw-toxic-10k"
    if not folder.is_dir():
        pytest.skip("real data not available")
    result = score_submission(folder / "sample_submission.csv", folder / "test_labels.csv")
    assert result.value == pytest.approx(0.5)
    assert result.n_rows == 2000


def test_cv_log_loss_is_what_sklearn_gives_on_the_same_submission_read_from_csv(tmp_path):
    from sklearn.metrics import log_loss

    from hybridstack.tasks import multiclass_log_loss

    rng = np.random.default_rng(4)
    Y = _pairwise_labels(50)
    P = rng.dirichlet([1, 1, 1], size=50).astype(np.float32)
    P[0] = [0.0, 0.0, 1.0]  # a confident miss: no extra clipping softens it
    Y[0] = [1, 0, 0]
    labels = _write(tmp_path / "labels.csv", range(50), _columns(PAIRWISE_LABELS, Y.T))
    sub = _write(tmp_path / "sub.csv", range(50), _columns(PAIRWISE_LABELS, P.T))
    read = pd.read_csv(sub)[PAIRWISE_LABELS].to_numpy()  # float64, as Kaggle's scorer reads it
    expected = log_loss(Y.argmax(axis=1), read, labels=[0, 1, 2])
    # float32 -> decimal text -> float64 moves each value by < 1e-8 of itself
    assert multiclass_log_loss(Y, P) == pytest.approx(expected, rel=1e-8)
    assert score_submission(sub, labels).value == pytest.approx(expected, rel=1e-12)
    assert expected > 0.7  # the miss costs what sklearn says (~36 / 50), not a 1e-7 clip's 16 / 50
