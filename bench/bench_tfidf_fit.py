"""TF-IDF featurisation: one analyser pass per text (fit_transform, then row slices) vs the
former fit on train+test followed by a transform of each split.

The texts of jigsaw-toxic-10k (train + test, 10,000 comments), the default [tfidf] settings
(word 1-2 + char_wb 2-5, 100k + 200k features). The two ways alternate over ``--repeats``
rounds in one process; the matrices are checked equal.

    python bench/bench_tfidf_fit.py [--repeats 2]

Writes bench/results/tfidf_fit.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hybridstack.config import TfidfConfig
from hybridstack.features.tfidf import build_tfidf, make_vectorizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "jigsaw-toxic-10k"
RESULTS = Path(__file__).resolve().parent / "results" / "tfidf_fit.json"


def two_passes(cfg: TfidfConfig, train: list[str], test: list[str]):
    """What build_tfidf did before: fit on train+test, then transform each split."""
    vectorizer = make_vectorizer(cfg).fit(train + test)
    return vectorizer.transform(train).tocsr(), vectorizer.transform(test).tocsr()


def one_pass(cfg: TfidfConfig, train: list[str], test: list[str]):
    features = build_tfidf(cfg, {"text": train}, {"text": test}, None)
    return features.X, features.X_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    read = lambda name: pd.read_csv(DATA / name, dtype=str, keep_default_na=False)["comment_text"].tolist()  # noqa: E731
    train, test = read("train.csv"), read("test.csv")
    cfg = TfidfConfig()
    seconds: dict[str, list[float]] = {"two_passes": [], "one_pass": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in (("two_passes", two_passes), ("one_pass", one_pass)):
            started = time.perf_counter()
            outputs[name] = fn(cfg, train, test)
            seconds[name].append(round(time.perf_counter() - started, 2))
    for a, b in zip(outputs["two_passes"], outputs["one_pass"], strict=True):
        a.sort_indices()
        assert a.shape == b.shape and (a != b).nnz == 0, "the two ways give different matrices"
    ratios = [t / o for t, o in zip(seconds["two_passes"], seconds["one_pass"], strict=True)]
    result = {"data": "jigsaw-toxic-10k train + test", "texts": len(train) + len(test),
              "features": int(outputs["one_pass"][0].shape[1]), "seconds": seconds,
              "speedup_median": round(statistics.median(ratios), 2),
              "matrices_equal": True, "repeats": args.repeats,
              "nnz": int(outputs["one_pass"][0].nnz + outputs["one_pass"][1].nnz),
              "dtype": str(np.dtype(outputs["one_pass"][0].dtype))}
    print(f"{result['texts']} texts, {result['features']} features: fit + transform "
          f"{statistics.median(seconds['two_passes']):.1f} s, one pass "
          f"{statistics.median(seconds['one_pass']):.1f} s: {result['speedup_median']}x")
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
