"""Paired bootstrap of two submissions on the same held-out rows: is B better than A?

Both submissions are scored against one labels file exactly as ``hybridstack score`` scores
them; then the test rows are resampled with replacement (the same resample for both, so the
interval is of the difference on shared rows, not of two independent scores) and the score
difference B - A recomputed each time. Prints and writes the point difference and its 95%
percentile interval.

    python bench/paired_bootstrap.py A.csv B.csv labels.csv [--name-a old --name-b new]
        [--resamples 2000] [--seed 0] [--out bench/results/bootstrap.json]

Multilabel: mean column-wise ROC-AUC (higher is better), rows labelled -1 left out per
column as on Jigsaw's leaderboard. Single-label: log loss (lower is better), per-row losses
clipped as sklearn's ``log_loss`` clips them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from hybridstack.commands.score import score_submission


def aligned(sub_path: Path, labels: pd.DataFrame, id_column: str) -> pd.DataFrame:
    sub = pd.read_csv(sub_path, dtype={id_column: str}).set_index(id_column)
    return sub.loc[labels.index]


def mean_auc(Y: np.ndarray, P: np.ndarray) -> float:
    aucs = []
    for j in range(Y.shape[1]):
        keep = Y[:, j] != -1
        y = Y[keep, j]
        if 0 < y.sum() < len(y):  # a resample may leave a rare label with one class
            aucs.append(roc_auc_score(y, P[keep, j]))
    return float(np.mean(aucs))


def row_log_losses(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    eps = np.finfo(np.float64).eps  # sklearn's log_loss clip
    P = np.clip(P.astype(np.float64), eps, 1 - eps)
    P = P / P.sum(axis=1, keepdims=True)
    return -np.log((P * Y).sum(axis=1))


def paired_bootstrap(a: Path, b: Path, labels_path: Path, resamples: int, seed: int,
                     id_column: str = "id") -> dict:
    labels = pd.read_csv(labels_path, dtype={id_column: str}).set_index(id_column)
    score_a, score_b = (score_submission(p, labels_path, id_column=id_column) for p in (a, b))
    sub_a, sub_b = aligned(a, labels, id_column), aligned(b, labels, id_column)
    columns = list(sub_a.columns)
    rng = np.random.default_rng(seed)
    if score_a.kind == "multilabel":
        Y = labels[columns].to_numpy()
        scored = np.flatnonzero((Y != -1).any(axis=1))
        Y, Pa, Pb = Y[scored], sub_a.to_numpy()[scored], sub_b.to_numpy()[scored]
        diffs = []
        for _ in range(resamples):
            rows = rng.integers(0, len(Y), len(Y))
            diffs.append(mean_auc(Y[rows], Pb[rows]) - mean_auc(Y[rows], Pa[rows]))
        better = "higher"
    else:
        if set(columns) <= set(labels.columns):
            Y = labels[columns].to_numpy(np.float64)
        else:  # one column of class names
            Y = (labels.iloc[:, [0]].to_numpy() == np.array(columns)[None, :]).astype(np.float64)
        loss_a, loss_b = row_log_losses(Y, sub_a.to_numpy()), row_log_losses(Y, sub_b.to_numpy())
        delta = loss_b - loss_a
        diffs = [delta[rng.integers(0, len(delta), len(delta))].mean() for _ in range(resamples)]
        better = "lower"
    diffs = np.array(diffs)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"metric": score_a.metric_name, "better": better, "rows": score_a.n_rows,
            "a": {"path": str(a), "score": score_a.value}, "b": {"path": str(b), "score": score_b.value},
            "difference_b_minus_a": score_b.value - score_a.value,
            "interval_95": [float(low), float(high)], "resamples": resamples, "seed": seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--name-a", default="A")
    parser.add_argument("--name-b", default="B")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = paired_bootstrap(args.a, args.b, args.labels, args.resamples, args.seed, args.id_column)
    result["a"]["name"], result["b"]["name"] = args.name_a, args.name_b
    low, high = result["interval_95"]
    print(f"{result['metric']} over {result['rows']} held-out rows ({result['better']} is better): "
          f"{args.name_a} {result['a']['score']:.4f}, {args.name_b} {result['b']['score']:.4f}, "
          f"{args.name_b} - {args.name_a} = {result['difference_b_minus_a']:+.4f} "
          f"(95% paired bootstrap {low:+.4f} .. {high:+.4f}, {args.resamples} resamples)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
