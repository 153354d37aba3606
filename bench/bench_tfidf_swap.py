"""The pairwise tfidf stage with the swapped matrix materialised and cached (before) vs derived
from the column layout on demand (after, ``PairColumns``), side by side in one run.

Data: an LMSYS-shaped folder from bench/scale_data.py (texts recombined from
../shared/data/llmeval2-pairwise, LMSYS's train:test ratio), ``--rows`` train rows.
"Before" is the code at ``--before`` (default: where this branch left main), extracted with
``git archive``; "after" is this working tree. Each run is a fresh subprocess (its own
``ru_maxrss``) that runs the whole tfidf stage (fit the vectorizer, build and cache the
matrices, cross-validate the logistic regression with swap augmentation and TTA) on a fresh
workdir, and reports its peak RSS, the stage's seconds and the bytes of features/. Runs
alternate before/after ``--repeats`` times; the medians and their after/before ratios are
printed and written to bench/results/tfidf_swap.json, with whether both versions' oof.npy
and test.npy are bit-identical.

    python bench/bench_tfidf_swap.py [--rows 20000] [--repeats 2] [--folds 3] [--max-iter 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from source_at import export_source

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "tfidf_swap.json"


# -- one run (child process; PYTHONPATH picks the code version) ----------------------------------


def run_child(data: Path, work: Path, folds: int, max_iter: int, shape_features: bool) -> None:

    import hybridstack
    from hybridstack.config import config_from_dict
    from hybridstack.stages import tfidf

    task = tomllib.loads((ROOT / "configs" / "lmsys.toml").read_text())["task"]
    cfg = config_from_dict({
        "experiment": "swapbench", "workdir": str(work), "task": task,
        "data": {name: str(data / f"{name}.csv") for name in ("train", "test")}
        | {"sample_submission": str(data / "sample_submission.csv")},
        "cv": {"n_splits": folds, "seed": 42},
        "tfidf": {"shape_features": shape_features, "swap_augment": True, "swap_tta": True,
                  "models": [{"name": "tfidf_logreg", "max_iter": max_iter}]},
        "embed": {"enabled": False}, "finetune": {"enabled": False}, "stack": {"enabled": False},
    })
    started = time.perf_counter()
    tfidf.run(cfg)
    seconds = time.perf_counter() - started
    model = next(work.rglob("oof.npy")).parent
    features = work / "cache" / "features"
    print(json.dumps({
        "code": str(Path(hybridstack.__file__).parent),
        "stage_seconds": round(seconds, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cache_bytes": sum(p.stat().st_size for p in features.rglob("*") if p.is_file()),
        "oof": str(model / "oof.npy"), "test": str(model / "test.npy"),
    }))


# -- the comparison (parent) -----------------------------------------------------------------------


def extract_before(ref: str, into: Path) -> str:
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    export_source(sha, into)
    return sha


def one_run(code: Path, data: Path, work: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--child", str(data), str(work), "--folds", str(args.folds),
           "--max-iter", str(args.max_iter)] + (["--no-shape-features"] if not args.shape_features else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    assert Path(record["code"]).parent == code.resolve(), record["code"]  # the intended version
    return record


def same_bytes(a: str, b: str) -> bool:
    return Path(a).read_bytes() == Path(b).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--max-iter", type=int, default=100,
                        help="LR iterations: the same work in both versions, kept small for time")
    parser.add_argument("--no-shape-features", dest="shape_features", action="store_false")
    parser.add_argument("--before", default=None, help="git ref of the 'before' code "
                        "(default: git merge-base HEAD main)")
    parser.add_argument("--data", type=Path, help="an LMSYS-shaped folder (default: generated)")
    args = parser.parse_args()
    if args.child:
        run_child(*args.child, args.folds, args.max_iter, args.shape_features)
        return

    with tempfile.TemporaryDirectory(prefix="bench_tfidf_swap_") as tmp:
        tmp = Path(tmp)
        before_ref = args.before or subprocess.run(
            ["git", "merge-base", "HEAD", "main"], cwd=ROOT, check=True, capture_output=True,
            text=True).stdout.strip()
        (tmp / "before").mkdir()
        sha = extract_before(before_ref, tmp / "before")
        data = args.data
        if data is None:
            data = tmp / "data"
            subprocess.run([sys.executable, str(ROOT / "bench" / "scale_data.py"), "lmsys",
                            str(args.rows), str(data)], check=True, capture_output=True)
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for repeat in range(args.repeats):  # interleaved, so load drift hits both alike
            for variant, code in (("before", tmp / "before"), ("after", ROOT)):
                work = tmp / f"work_{variant}_{repeat}"
                record = one_run(code, data, work, args)
                runs[variant].append(record)
                print(f"{variant} #{repeat}: {record['stage_seconds']:.1f}s, peak RSS "
                      f"{record['peak_rss_bytes'] / 2**20:.0f} MiB, cache "
                      f"{record['cache_bytes'] / 2**20:.0f} MiB", flush=True)
        identical = all(same_bytes(b[kind], a[kind]) for b, a in zip(runs["before"], runs["after"])
                        for kind in ("oof", "test"))
        n_test = sum(1 for _ in open(data / "test.csv", encoding="utf-8")) - 1  # noqa: SIM115
        summary = {}
        for metric in ("peak_rss_bytes", "cache_bytes", "stage_seconds"):
            before = statistics.median(r[metric] for r in runs["before"])
            after = statistics.median(r[metric] for r in runs["after"])
            ratios = [a[metric] / b[metric] for b, a in zip(runs["before"], runs["after"])]
            summary[metric] = {"before": before, "after": after,
                               "ratio_after_over_before": round(statistics.median(ratios), 3)}
            print(f"{metric}: before {before:,.1f}  after {after:,.1f}  "
                  f"after/before {summary[metric]['ratio_after_over_before']:.3f}")
        print(f"oof.npy and test.npy bit-identical: {identical}")
        for records in runs.values():
            for record in records:
                for key in ("oof", "test", "code"):
                    record.pop(key)
        result = {
            "what": "pairwise tfidf stage: swapped matrix materialised+cached (before) vs "
                    "derived by PairColumns on demand (after)",
            "data": f"bench/scale_data.py lmsys {args.rows} (from llmeval2-pairwise)",
            "train_rows": args.rows, "test_rows": n_test, "folds": args.folds,
            "max_iter": args.max_iter, "shape_features": args.shape_features,
            "tfidf": "defaults (100k word + 200k char n-grams, min_df 2), swap augment + TTA",
            "before_commit": sha, "repeats": args.repeats, "runs": runs, "summary": summary,
            "oof_test_bit_identical": identical,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
