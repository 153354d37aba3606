"""Reported CV on shuffled labels, averaged over many shuffles: is any model's score biased?

tests/test_honest_scores.py runs the pipeline once on real Jigsaw text whose label rows are
permuted (no signal), and allows a one-sided 0.02. One shuffle cannot show "within 0.01 of
chance": over 4,000 rows the six-label mean ROC-AUC of a model that knows nothing still varies
by about 0.02 from shuffle to shuffle (the rare labels, threat with ~60 positives, swing by
0.05 alone). A leak is a bias that every shuffle shares, so this runs the same pipeline
(TF-IDF logistic regression and NB-SVM, MiniLM LightGBM and MLP, the stack) on ``--shuffles``
different permutations and reports, per model, the mean reported CV, its standard deviation
over shuffles and the standard error of the mean. The texts are the same in every shuffle,
so the embedding cache is shared and only the first shuffle encodes.

    python bench/bench_shuffled.py [--rows 4000] [--shuffles 8] [--workdir /tmp/shuffled]

writes bench/results/shuffled.json. Needs ../shared/data/jigsaw-toxic-10k.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hybridstack.config import JIGSAW_LABELS, config_from_dict
from hybridstack.pipeline import run_pipeline
from hybridstack.runs import ExperimentDir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "jigsaw-toxic-10k" / "train.csv"
RESULTS = ROOT / "bench" / "results" / "shuffled.json"
CHANCE = 0.5


def shuffled_config(workdir: Path, train: Path, seed: int) -> dict:
    """The honest-scores test's pipeline (plus NB-SVM, which init adds for multilabel); LightGBM
    on 1 thread, so a busy second core does not stall its OpenMP barrier."""
    return {
        "experiment": f"shuffle{seed}", "workdir": str(workdir),
        "task": {"kind": "multilabel", "text_columns": ["comment_text"]},
        "data": {"train": str(train)},
        "tfidf": {"max_word_features": 20000, "max_char_features": 20000, "nbsvm": [{}]},
        "embed": {"model": "embedded:minilm", "prefix": "", "max_seq_length": 128,
                  "lgbm": [{"learning_rate": 0.1, "num_threads": 1}], "mlp": [{}]},
        "finetune": {"enabled": False},
    }


def reported_scores(run_dir: Path) -> dict[str, float]:
    exp_dir = ExperimentDir(run_dir)
    scores = {m.name: m.load_scores()["overall"] for m in exp_dir.finished_models()}
    scores["stack"] = exp_dir.stack.load_scores()["overall"]
    return scores


def summarize(per_shuffle: list[dict[str, float]]) -> dict:
    out = {}
    for name in per_shuffle[0]:
        values = [s[name] for s in per_shuffle]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        mean = statistics.fmean(values)
        out[name] = {"mean": round(mean, 4), "sd": round(sd, 4),
                     "se_of_mean": round(sd / math.sqrt(len(values)), 4),
                     "mean_minus_chance": round(mean - CHANCE, 4),
                     "min": round(min(values), 4), "max": round(max(values), 4),
                     "values": [round(v, 4) for v in values]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--shuffles", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the runs here (default: a temporary folder); a re-run in the "
                             "same folder refits only what changed, e.g. the stack")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False).head(args.rows)
    labels = frame[JIGSAW_LABELS].to_numpy()
    per_shuffle, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-shuffled-") as tmp:
        workdir = args.workdir or Path(tmp)  # one cache/ for every shuffle: same texts, encoded once
        workdir.mkdir(parents=True, exist_ok=True)
        for seed in range(args.shuffles):
            shuffled = frame.copy()
            # the same permutation as the test for seed 0
            shuffled[JIGSAW_LABELS] = labels[np.random.default_rng(seed).permutation(len(frame))]
            train = workdir / f"train{seed}.csv"
            shuffled.to_csv(train, index=False)
            cfg = config_from_dict(shuffled_config(workdir, train, seed))
            code, _ = run_pipeline(cfg)
            if code != 0:
                raise SystemExit(f"shuffle {seed}: the pipeline exited {code}")
            per_shuffle.append(reported_scores(cfg.run_dir))
            print(f"shuffle {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in per_shuffle[-1].items()),
                  flush=True)
    summary = summarize(per_shuffle)
    result = {"data": f"jigsaw-toxic-10k, first {args.rows} rows, label rows permuted",
              "metric": "mean ROC-AUC over 6 labels, the CV each model reports (all rows; the "
                        "stack's level over its rows_validated)",
              "chance": CHANCE, "shuffles": args.shuffles, "seconds": round(time.perf_counter() - started),
              "models": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, summary))
    print(f"\n{'model':<{width}}  mean    sd      se      mean-0.5  (over {args.shuffles} shuffles)")
    for name, s in summary.items():
        print(f"{name:<{width}}  {s['mean']:.4f}  {s['sd']:.4f}  {s['se_of_mean']:.4f}  "
              f"{s['mean_minus_chance']:+.4f}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
