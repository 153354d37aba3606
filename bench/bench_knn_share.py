"""The embed stage's time with one kNN search per fold shared by its heads, against before.

The embed stage fits a LightGBM and an MLP head, each wrapped in a kNN-feature head; both
search the same neighbours (same folds, keys, groups, labels, k). Since the shared search cache
the second head reads the first head's features instead. This runs the whole embed stage
(``embed.run``: features, pool, both heads over 5 folds, outputs) on a Jigsaw-shaped synthetic
competition (hybridstack.synthetic, multilabel) in a fresh folder per run, once with the
current code and once with ``--before-ref`` (exported with ``git archive``, imported through
PYTHONPATH), alternating ``--repeats`` times, and reports the median time ratio. Both write
the same oof.npy/test.npy: checked bit for bit on every repeat.

Encoding is not what this measures: the encoder is replaced, in both, by deterministic random
unit vectors of 384 dimensions (e5-small-v2's width); the heads are bounded (LightGBM
``--lgbm-rounds`` on 1 thread, MLP ``--mlp-epochs``), as bench_scale.py does, so the kNN share
of the stage is that of a short fit (on Kaggle's early-stopped heads it is smaller in
proportion, the same in seconds).

    python bench/bench_knn_share.py [--rows 20000] [--test-rows 20000] [--index flat]
        [--repeats 2] [--before-ref 66951fd]

writes bench/results/knn_share.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from source_at import export_source

RESULTS = Path(__file__).parent / "results" / "knn_share.json"
REPO = Path(__file__).resolve().parents[1]
BEFORE_REF = "66951fd"  # main before the shared kNN search
DIM = 384
HEADS = ("minilm_lgbm", "minilm_mlp")


def random_unit_vectors(texts: list[str]) -> np.ndarray:
    """One deterministic unit vector per text (seeded by its CRC), the same in every process."""
    out = np.empty((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        out[i] = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(DIM)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def fake_encode_fields(cache, task, splits):
    return [{name: random_unit_vectors(list(ds.fields[name])) for name in task.field_names}
            for ds in splits]


def child(args: argparse.Namespace) -> None:
    """Run the embed stage once in ``args.workdir`` and print its seconds as JSON."""
    from hybridstack.config import config_from_dict
    from hybridstack.features import embed_matrix
    from hybridstack.stages import embed as embed_stage
    from hybridstack.synthetic import write_competition

    embed_matrix.encode_fields = fake_encode_fields
    work = Path(args.workdir)
    raw = write_competition(work / "data", "multilabel", args.rows, args.test_rows, seed=0)
    raw.update({"experiment": "share", "workdir": str(work / "work"), "cv": {"n_splits": 5},
                "tfidf": {"enabled": False}, "finetune": {"enabled": False},
                "stack": {"enabled": False}})
    raw["embed"] = {"enabled": True, "model": "embedded:minilm", "knn_index": args.index,
                    "lgbm": [{"name": "lgbm", "n_estimators": args.lgbm_rounds, "num_threads": 1}],
                    "mlp": [{"name": "mlp", "max_epochs": args.mlp_epochs}]}
    cfg = config_from_dict(raw)
    started = time.perf_counter()
    embed_stage.run(cfg)
    seconds = time.perf_counter() - started
    runs = work / "work" / "runs" / "share" / "models"
    np.savez(work / "outputs.npz", **{f"{h}_{f}": np.load(runs / h / f"{f}.npy")
                                      for h in HEADS for f in ("oof", "test")})
    print(json.dumps({"seconds": round(seconds, 2)}))


def run_stage(args: argparse.Namespace, source: Path, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--workdir", str(workdir), "--rows", str(args.rows),
           "--test-rows", str(args.test_rows), "--index", args.index,
           "--lgbm-rounds", str(args.lgbm_rounds), "--mlp-epochs", str(args.mlp_epochs)]
    env = {**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"embed stage failed ({source}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_outputs(a: Path, b: Path) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return sorted(x.files) == sorted(y.files) and all(
            np.array_equal(x[k], y[k], equal_nan=True) for k in x.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--test-rows", type=int, default=20_000)
    parser.add_argument("--index", choices=["flat", "ivf"], default="flat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lgbm-rounds", type=int, default=50)
    parser.add_argument("--mlp-epochs", type=int, default=3)
    parser.add_argument("--before-ref", default=BEFORE_REF)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        sources = {"after": REPO, "before": export_source(args.before_ref, Path(tmp) / "before")}
        seconds: dict[str, list[float]] = {"after": [], "before": []}
        identical = []
        for rep in range(args.repeats):
            outputs = {}
            for name in ("after", "before") if rep % 2 == 0 else ("before", "after"):
                workdir = Path(tmp) / f"{name}{rep}"
                seconds[name].append(run_stage(args, sources[name], workdir)["seconds"])
                outputs[name] = workdir / "outputs.npz"
                print(f"repeat {rep} {name:>6}: embed stage {seconds[name][-1]:.1f}s", flush=True)
            identical.append(same_outputs(outputs["after"], outputs["before"]))
    ratios = [b / a for a, b in zip(seconds["after"], seconds["before"], strict=True)]
    summary = {
        "rows": args.rows, "test_rows": args.test_rows, "dim": DIM, "task": "multilabel (6 labels)",
        "folds": 5, "index": args.index, "k": 20, "lgbm_rounds": args.lgbm_rounds,
        "mlp_epochs": args.mlp_epochs, "before_ref": args.before_ref,
        "seconds": seconds, "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "before_over_after": round(statistics.median(ratios), 2),
        "outputs_bit_identical": all(identical),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    print(f"embed stage: {summary['before_over_after']:.2f}x faster than {args.before_ref}; "
          f"outputs bit-identical: {summary['outputs_bit_identical']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
