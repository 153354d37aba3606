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

``--dataset pairwise`` does the same on llmeval2-pairwise (3 classes, log loss; the
multinomial stackers): its winner rows are permuted, prompts and responses kept. There chance
is the log loss of always predicting the class shares, and a leak shows as a reported log
loss below it.

    python bench/bench_shuffled.py [--dataset jigsaw|pairwise] [--rows 4000] [--shuffles 8]
        [--workdir /tmp/shuffled] [--cache DIR]

writes bench/results/shuffled.json (jigsaw) or shuffled_pairwise.json. Needs
../shared/data/jigsaw-toxic-10k or llmeval2-pairwise. ``--cache`` seeds the embedding cache
from an earlier run's ``cache/embeddings`` (e.g. bench/leaderboard.py's), so nothing is encoded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hybridstack.config import JIGSAW_LABELS, PAIRWISE_LABELS, config_from_dict
from hybridstack.pipeline import run_pipeline
from hybridstack.runs import ExperimentDir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Dataset:
    """What differs between the two benchmarks: the data, its labels, the task and chance."""

    name: str
    folder: str
    labels: list[str]
    task: dict
    tfidf: dict
    max_seq_length: int
    result: str
    metric: str

    @property
    def higher_is_better(self) -> bool:
        return self.name == "jigsaw"  # ROC-AUC; pairwise is log loss

    def chance(self, labels: np.ndarray) -> float:
        """The score of a model that knows nothing: ROC-AUC 0.5, or (log loss) the entropy
        of the class shares, what always predicting them scores."""
        if self.higher_is_better:
            return 0.5
        shares = labels.astype(float).mean(axis=0)
        return float(-(shares * np.log(shares)).sum())


DATASETS = {
    "jigsaw": Dataset(
        "jigsaw", "jigsaw-toxic-10k", JIGSAW_LABELS,
        {"kind": "multilabel", "text_columns": ["comment_text"]},
        {"nbsvm": [{}]},  # NB-SVM: init adds it for multilabel
        128, "shuffled.json", "mean ROC-AUC over 6 labels"),
    "pairwise": Dataset(
        "pairwise", "llmeval2-pairwise", PAIRWISE_LABELS,
        {"kind": "pairwise", "prompt_column": "prompt",
         "response_columns": ["response_a", "response_b"], "winner_columns": PAIRWISE_LABELS},
        {},  # logistic regression on [prompt, A, B, A - B] at the default C = 4 (init now writes
        # 0.25 for pairwise; shuffled_pairwise.json was measured at 4, the more overconfident)
        256, "shuffled_pairwise.json", "log loss over 3 classes"),  # 256: the leaderboard's cache
}


def shuffled_config(dataset: Dataset, workdir: Path, train: Path, seed: int) -> dict:
    """The honest-scores test's pipeline; LightGBM on 1 thread, so a busy second core does not
    stall its OpenMP barrier."""
    return {
        "experiment": f"shuffle{seed}", "workdir": str(workdir),
        "task": dataset.task,
        "data": {"train": str(train)},
        "tfidf": {"max_word_features": 20000, "max_char_features": 20000, **dataset.tfidf},
        "embed": {"model": "embedded:minilm", "prefix": "", "max_seq_length": dataset.max_seq_length,
                  "lgbm": [{"learning_rate": 0.1, "num_threads": 1}], "mlp": [{}]},
        "finetune": {"enabled": False},
    }


def reported_scores(run_dir: Path) -> dict[str, float]:
    exp_dir = ExperimentDir(run_dir)
    scores = {m.name: m.load_scores()["overall"] for m in exp_dir.finished_models()}
    scores["stack"] = exp_dir.stack.load_scores()["overall"]
    return scores


def summarize(per_shuffle: list[dict[str, float]], chance: float, higher_is_better: bool) -> dict:
    """Per model: the mean reported CV over shuffles and its skill, the mean's distance from
    chance in the direction of a better score (a leak shows as skill > 0)."""
    out = {}
    for name in per_shuffle[0]:
        values = [s[name] for s in per_shuffle]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        mean = statistics.fmean(values)
        out[name] = {"mean": round(mean, 4), "sd": round(sd, 4),
                     "se_of_mean": round(sd / math.sqrt(len(values)), 4),
                     "skill": round(mean - chance if higher_is_better else chance - mean, 4),
                     "min": round(min(values), 4), "max": round(max(values), 4),
                     "values": [round(v, 4) for v in values]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="jigsaw")
    parser.add_argument("--rows", type=int, default=4000, help="the first rows of train.csv")
    parser.add_argument("--shuffles", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/<dataset's file>")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the runs here (default: a temporary folder); a re-run in the "
                             "same folder refits only what changed, e.g. the stack")
    parser.add_argument("--cache", type=Path, default=None,
                        help="an earlier run's cache/embeddings folder to start from")
    args = parser.parse_args()
    dataset = DATASETS[args.dataset]
    out = args.out or RESULTS / dataset.result
    logging.basicConfig(level=logging.WARNING)
    frame = pd.read_csv(DATA / dataset.folder / "train.csv", dtype=str,
                        keep_default_na=False).head(args.rows)
    labels = frame[dataset.labels].to_numpy()
    chance = dataset.chance(labels.astype(int))
    per_shuffle, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-shuffled-") as tmp:
        workdir = args.workdir or Path(tmp)  # one cache/ for every shuffle: same texts, encoded once
        workdir.mkdir(parents=True, exist_ok=True)
        if args.cache is not None:
            shutil.copytree(args.cache, workdir / "cache" / "embeddings", dirs_exist_ok=True)
        for seed in range(args.shuffles):
            shuffled = frame.copy()
            # the same permutation as the test for seed 0
            shuffled[dataset.labels] = labels[np.random.default_rng(seed).permutation(len(frame))]
            train = workdir / f"train{seed}.csv"
            shuffled.to_csv(train, index=False)
            cfg = config_from_dict(shuffled_config(dataset, workdir, train, seed))
            code, _ = run_pipeline(cfg)
            if code != 0:
                raise SystemExit(f"shuffle {seed}: the pipeline exited {code}")
            per_shuffle.append(reported_scores(cfg.run_dir))
            print(f"shuffle {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in per_shuffle[-1].items()),
                  flush=True)
    summary = summarize(per_shuffle, chance, dataset.higher_is_better)
    result = {"data": f"{dataset.folder}, first {len(frame)} rows, label rows permuted",
              "metric": f"{dataset.metric}, the CV each model reports (all rows; the "
                        "stack's level over its rows_validated)",
              "chance": round(chance, 4),
              "skill": "mean - chance for ROC-AUC, chance - mean for log loss: > 0 is skill",
              "shuffles": args.shuffles, "seconds": round(time.perf_counter() - started),
              "models": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, summary))
    print(f"\n{'model':<{width}}  mean    sd      se      skill  (chance {chance:.4f}, "
          f"over {args.shuffles} shuffles)")
    for name, s in summary.items():
        print(f"{name:<{width}}  {s['mean']:.4f}  {s['sd']:.4f}  {s['se_of_mean']:.4f}  {s['skill']:+.4f}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
