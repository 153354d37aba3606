"""``hybridstack score``: score a submission against held-out labels as the leaderboard does.

Log loss for pairwise and multiclass, mean column-wise ROC-AUC for multilabel (rows
labelled -1 are not scored, per column, as on Jigsaw's leaderboard). The math is the
same as the cross-validation scores (``tasks.multiclass_log_loss`` and
``tasks.mean_column_auc``), so a CV number and a test number can be compared directly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hybridstack.errors import HybridstackError
from hybridstack.tables import read_table
from hybridstack.tasks import mean_column_auc, multiclass_log_loss

UNSCORED = -1  # Jigsaw's test_labels.csv marks rows left out of scoring with -1


@dataclass
class ScoreResult:
    kind: str
    metric_name: str
    value: float
    n_rows: int  # rows that counted in the score
    n_skipped: int = 0  # rows whose labels are all -1
    per_column: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = f", {self.n_skipped} rows labelled -1 skipped" if self.n_skipped else ""
        return f"{self.metric_name} = {self.value:.6f} ({self.kind}, {self.n_rows} rows scored{skipped})"


def score_submission(submission: str | Path, labels: str | Path, kind: str | None = None,
                     id_column: str = "id") -> ScoreResult:
    """Score ``submission`` against ``labels``, joining rows on ``id_column`` (as strings).

    Parameters
    ----------
    submission : path
        CSV with the id column and one probability column per class or label.
    labels : path
        CSV with the id column and either the same columns holding 0/1 (or -1: not
        scored), or one column of class names matching the submission's columns.
    kind : {"pairwise", "multilabel", "multiclass"}, optional
        Default: detected from the label columns.
    """
    sub = _read_indexed(submission, id_column, "submission")
    lab = _read_indexed(labels, id_column, "labels")
    _check_same_ids(sub.index, lab.index, Path(submission).name, Path(labels).name)
    lab = lab.loc[sub.index]
    P = _probabilities(sub)
    matched = [c for c in sub.columns if c in lab.columns]
    if not matched:
        return _score_class_names(lab, P, list(sub.columns), kind)
    missing = [c for c in sub.columns if c not in lab.columns]
    if missing:
        raise HybridstackError(f"labels file has no column(s) {', '.join(map(repr, missing))} that the "
                               "submission predicts; use the labels file of the same competition")
    Y = _label_matrix(lab[matched])
    kind = kind or _detect_kind(matched, Y)
    if kind == "multilabel":
        return _score_multilabel(Y, P, matched)
    return _score_single_label(kind, Y, P, matched)


def _read_indexed(path: str | Path, id_column: str, what: str) -> pd.DataFrame:
    frame = read_table(path).frame
    if id_column not in frame.columns:
        raise HybridstackError(f"{what} {Path(path).name} has no id column {id_column!r} "
                               f"(found {', '.join(frame.columns[:8])}); pass --id-column")
    ids = frame[id_column].astype(str).str.strip()
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise HybridstackError(f"{what} {Path(path).name}: {len(duplicated)} duplicate ids "
                               f"(e.g. {duplicated.iloc[0]!r}); ids must be unique")
    return frame.drop(columns=[id_column]).set_axis(ids, axis=0)


def _check_same_ids(sub_ids: pd.Index, label_ids: pd.Index, sub_name: str, label_name: str) -> None:
    missing = label_ids.difference(sub_ids)
    extra = sub_ids.difference(label_ids)
    if len(missing) or len(extra):
        example = missing[0] if len(missing) else extra[0]
        raise HybridstackError(
            f"ids differ: {len(missing)} ids of {label_name} are not in {sub_name}, {len(extra)} submission "
            f"ids are not in {label_name} (e.g. {example!r}); score the submission for that test file"
        )


def _probabilities(sub: pd.DataFrame) -> np.ndarray:
    """``(n, C)`` float64 from the submission's value columns; NaN or text is an error."""
    if sub.shape[1] == 0:
        raise HybridstackError("submission has only the id column: no probabilities to score")
    values = sub.apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce"))
    bad = values.isna().to_numpy()
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise HybridstackError(f"submission has {int(bad.sum())} NaN or non-numeric probabilities "
                               f"(first: id {sub.index[row]!r}, column {sub.columns[col]!r})")
    return values.to_numpy(dtype=np.float64)


def _label_matrix(lab: pd.DataFrame) -> np.ndarray:
    """``(n, K)`` float64 labels; each must be 0, 1 or -1 (not scored)."""
    Y = lab.apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce")).to_numpy(dtype=np.float64)
    bad = ~np.isin(Y, [0, 1, UNSCORED])
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise HybridstackError(f"labels must be 0, 1 or -1; {int(bad.sum())} are not (first: id "
                               f"{lab.index[row]!r}, column {lab.columns[col]!r} = {lab.iat[row, col]!r})")
    return Y


def _detect_kind(columns: list[str], Y: np.ndarray) -> str:
    """winner_* columns: pairwise; -1 or rows with 0 or 2+ labels: multilabel; one-hot: multiclass."""
    if all(c.startswith("winner_") for c in columns):
        return "pairwise"
    if len(columns) == 1:
        return "multiclass"  # one 0/1 column scored like a binary competition: log loss
    if (Y == UNSCORED).any() or (Y.sum(axis=1) != 1).any():
        return "multilabel"
    return "multiclass"


def _score_multilabel(Y: np.ndarray, P: np.ndarray, columns: list[str]) -> ScoreResult:
    per_column = {}
    for j, name in enumerate(columns):
        scored = Y[:, j] != UNSCORED
        y = Y[scored, j]
        if 0 < y.sum() < len(y):  # ROC-AUC needs both classes; the mean skips the others
            per_column[name] = mean_column_auc(y[:, None], P[scored, j][:, None])
    if not per_column:
        raise HybridstackError("no label column has both classes among the scored rows: ROC-AUC is undefined")
    rows_scored = (Y != UNSCORED).any(axis=1)
    return ScoreResult("multilabel", "mean_roc_auc", float(np.mean(list(per_column.values()))),
                       int(rows_scored.sum()), int((~rows_scored).sum()), per_column)


def _score_single_label(kind: str, Y: np.ndarray, P: np.ndarray, columns: list[str]) -> ScoreResult:
    if (Y == UNSCORED).any():
        raise HybridstackError(f"{kind} labels must be 0 or 1; -1 (not scored) is for multilabel: pass --kind multilabel")
    if len(columns) == 1:  # binary: the column is the positive class's probability
        Y, P = np.hstack([1 - Y, Y]), np.hstack([1 - P, P])
    elif (Y.sum(axis=1) != 1).any():
        raise HybridstackError(f"{kind} labels must be one-hot (exactly one 1 per row in "
                               f"{', '.join(columns)}); for independent labels pass --kind multilabel")
    return ScoreResult(kind, "log_loss", multiclass_log_loss(Y, P), len(Y))


def _score_class_names(lab: pd.DataFrame, P: np.ndarray, classes: list[str], kind: str | None) -> ScoreResult:
    """Labels given as one column of class names, one submission column per class."""
    if lab.shape[1] != 1 or kind == "multilabel":
        raise HybridstackError(f"labels columns {list(lab.columns)} match none of the submission's {classes}; "
                               "give one label column of class names or the same columns as the submission")
    names = lab.iloc[:, 0].astype(str).str.strip()
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise HybridstackError(f"labels {unknown[:5]} are not submission columns {classes}; "
                               "the class names must match the column names")
    codes = names.map({c: i for i, c in enumerate(classes)}).to_numpy()
    Y = np.eye(len(classes))[codes]
    return ScoreResult(kind or "multiclass", "log_loss", multiclass_log_loss(Y, P), len(Y))


# -- command line -------------------------------------------------------------------------


def cmd_score(args: argparse.Namespace) -> None:
    result = score_submission(args.submission, args.labels, args.kind, args.id_column)
    print(result.summary())
    if result.per_column:
        print("  " + "  ".join(f"{name}={auc:.5f}" for name, auc in result.per_column.items()))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="score a submission.csv against held-out labels")
    p.add_argument("submission", help="submission CSV (id + probability columns)")
    p.add_argument("labels", help="labels CSV (id + 0/1/-1 columns, or one column of class names)")
    p.add_argument("--kind", choices=["pairwise", "multilabel", "multiclass"],
                   help="task kind (default: detected from the label columns)")
    p.add_argument("--id-column", default="id", help="the id column of both files (default: id)")
    p.set_defaults(func=cmd_score)
