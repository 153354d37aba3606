"""Size of a training run's output before and after pruning, and whether predict agrees with it.

For each dataset folder (default: ../shared/data/jigsaw-toxic-10k and llmeval2-pairwise), in a
fresh workdir bench/results/tmp/run_size/<dataset>/work, this measures on real data:

1. training as a user would (timed):
       hybridstack init <folder> --no-gpu -o <work>/cfg.toml
       hybridstack run all -c <work>/cfg.toml
2. sizes in bytes: the workdir, runs/, cache/embeddings, cache/features, every
   runs/<exp>/models/* folder and runs/<exp>/stack, the fine-tune's fold_*/best/ and any
   fold_*/last/ folders;
3. agreement of ``hybridstack predict runs/<exp> --input ... --submission ...`` with the run's
   own runs/<exp>/submission.csv, on test.csv and on a shuffled random half of its rows
   (seed 0, with a matching --sample); each predict's wall time, the texts it encoded (its
   "embeddings: N texts, ... M encoded" log lines) and whether every file of the workdir
   (run folder included) is byte-identical afterwards;
4. ``hybridstack cache prune --for-inference <work>``, the sizes again, and the full-file
   predict once more.

Results go to bench/results/run_size.json; a short table is printed. A failing predict or
prune is recorded (command, exit code, stderr tail), not raised.

    python bench/bench_run_size.py [--datasets jigsaw-toxic-10k llmeval2-pairwise]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from leaderboard import DATA, RESULTS, hybridstack

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATASETS = ("jigsaw-toxic-10k", "llmeval2-pairwise")
TMP = RESULTS / "tmp" / "run_size"
ENCODED = re.compile(r"embeddings: (\d+) texts, .*?(\d+) encoded")


# -- running the CLI ------------------------------------------------------------------------------


def cli(*args: str) -> dict:
    """Run ``hybridstack ARGS``; unlike leaderboard.hybridstack, keep stderr and never raise."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hybridstack", *args],
                          capture_output=True, text=True)
    return {"command": "hybridstack " + " ".join(args), "rc": proc.returncode,
            "seconds": round(time.perf_counter() - started, 1),
            "stdout": proc.stdout, "stderr": proc.stderr}


def failure(result: dict) -> dict:
    """What to record of a failed command."""
    return {"command": result["command"], "rc": result["rc"],
            "stdout_tail": result["stdout"][-2000:], "stderr_tail": result["stderr"][-4000:]}


def train(folder: Path, work: Path) -> tuple[Path, float]:
    """init + run all in a fresh ``work``; return (runs/<exp>, seconds of run all)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = work / "cfg.toml"
    hybridstack("init", str(folder), "--no-gpu", "-o", str(config), "--experiment", folder.name)
    seconds, out = hybridstack("run", "all", "-c", str(config))
    print(out.strip(), flush=True)
    return work / "runs" / folder.name, seconds


# -- sizes and hashes -----------------------------------------------------------------------------


def du(path: Path) -> int | None:
    """Bytes of the regular files under ``path`` (symlinks not followed); None if absent."""
    if not path.exists():
        return None
    if path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def sizes(work: Path, exp_dir: Path) -> dict:
    """Bytes of the workdir and each part of it that the brief names."""
    models = sorted(p for p in (exp_dir / "models").glob("*") if p.is_dir())
    best = sorted((exp_dir / "models").glob("*/fold_*/best"))
    last = sorted((exp_dir / "models").glob("*/fold_*/last"))
    return {
        "workdir": du(work),
        "runs": du(work / "runs"),
        "cache/embeddings": du(work / "cache" / "embeddings"),
        "cache/features": du(work / "cache" / "features"),
        "models": {p.name: du(p) for p in models},
        "stack": du(exp_dir / "stack"),
        "finetune_best": {str(p.relative_to(exp_dir)): du(p) for p in best},
        "finetune_best_total": sum(du(p) for p in best),
        "finetune_last": {str(p.relative_to(exp_dir)): du(p) for p in last},
    }


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (a new or lost file shows too)."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            hashes[str(path.relative_to(root))] = digest
    return hashes


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# -- predicting and comparing ---------------------------------------------------------------------


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV with every cell as the exact string in the file."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def predict(exp_dir: Path, work: Path, scratch: Path, test: Path, sample: Path | None) -> dict:
    """One ``predict --submission`` with a fresh --cache-dir; time, encoded texts, read-only."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    args = [str(exp_dir), "--input", str(test), "--submission", str(scratch / "sub.csv"),
            "--cache-dir", str(scratch / "cache")]
    if sample is not None:
        args += ["--sample", str(sample)]
    before = file_hashes(work)
    result = cli("predict", *args)
    changed = changed_files(before, file_hashes(work))
    matches = ENCODED.findall(result["stderr"])
    lines = [line.split("\x1b[A")[-1].strip()  # drop the progress bar drawn before it
             for line in result["stderr"].splitlines() if "embeddings:" in line]
    record = {
        "seconds": result["seconds"],
        "embedding_lines": lines,
        "encoded_texts": sum(int(m[1]) for m in matches) if matches else None,
        "read_only_ok": not changed,
        "changed_files": changed[:20],
        "run_folder_changed": [f for f in changed if f.startswith(str(exp_dir.relative_to(work)))],
        "submission": str(scratch / "sub.csv"),
    }
    if result["rc"] != 0:
        record["failed"] = failure(result)
    return record


def max_abs_diff(a: pd.DataFrame, b: pd.DataFrame, columns: list[str]) -> float:
    diff = np.abs(a[columns].astype(float).to_numpy() - b[columns].astype(float).to_numpy())
    return float(diff.max()) if diff.size else 0.0


def compare_full(submission: Path, reference: Path) -> dict:
    """predict's submission vs the run's: same ids in the same order, same columns, max diff."""
    got, want = read_csv(submission), read_csv(reference)
    id_col = want.columns[0]
    same_columns = list(got.columns) == list(want.columns)
    same_ids = got[id_col].tolist() == want[id_col].tolist()
    result = {"same_columns": same_columns, "same_ids_in_order": same_ids,
              "rows": len(got), "reference_rows": len(want)}
    if same_columns and same_ids:
        result["max_abs_diff"] = max_abs_diff(got, want, list(want.columns[1:]))
    else:
        result["columns"] = [list(got.columns), list(want.columns)]
    return result


def compare_subset(subset_sub: Path, full_sub: Path, subset_test: Path) -> dict:
    """Each subset row vs the same id's row of the full-file prediction."""
    got, full = read_csv(subset_sub), read_csv(full_sub)
    id_col = full.columns[0]
    expected_ids = read_csv(subset_test)[id_col].tolist()
    full = full.set_index(id_col).loc[got[id_col]].reset_index()
    return {"rows": len(got), "same_columns": list(got.columns) == list(full.columns),
            "ids_in_input_order": got[id_col].tolist() == expected_ids,
            "max_abs_diff": max_abs_diff(got, full, list(full.columns[1:]))}


def write_subset(folder: Path, scratch: Path) -> tuple[Path, Path]:
    """A shuffled random half of test.csv (seed 0) and the sample submission of those ids."""
    scratch.mkdir(parents=True, exist_ok=True)
    test = read_csv(folder / "test.csv").sample(frac=0.5, random_state=0)
    sample = read_csv(folder / "sample_submission.csv")
    id_col = sample.columns[0]
    sample = sample.set_index(id_col).loc[test[id_col]].reset_index()
    test_path, sample_path = scratch / "test_half.csv", scratch / "sample_half.csv"
    test.to_csv(test_path, index=False)
    sample.to_csv(sample_path, index=False)
    return test_path, sample_path


def agreement(folder: Path, work: Path, exp_dir: Path, scratch: Path) -> tuple[dict, dict]:
    """Full-file and half-file predicts; return (summary, per-predict details)."""
    full = predict(exp_dir, work, scratch / "full", folder / "test.csv", None)
    details = {"full": full}
    if "failed" in full:
        return {"full_failed": full["failed"]}, details
    full_cmp = compare_full(Path(full["submission"]), exp_dir / "submission.csv")
    subset_test, subset_sample = write_subset(folder, scratch / "subset_input")
    subset = predict(exp_dir, work, scratch / "subset", subset_test, subset_sample)
    details.update(full_compare=full_cmp, subset=subset)
    summary = {"full_max_abs_diff": full_cmp.get("max_abs_diff"), "full_rows": full_cmp["rows"]}
    if "failed" in subset:
        summary["subset_failed"] = subset["failed"]
    else:
        subset_cmp = compare_subset(Path(subset["submission"]), Path(full["submission"]),
                                    subset_test)
        details["subset_compare"] = subset_cmp
        summary.update(subset_rows=subset_cmp["rows"],
                       subset_max_abs_diff=subset_cmp["max_abs_diff"])
    summary.update(
        predict_seconds={k: details[k]["seconds"] for k in ("full", "subset")},
        encoded_texts={k: details[k]["encoded_texts"] for k in ("full", "subset")},
        read_only_ok=full["read_only_ok"] and subset["read_only_ok"])
    return summary, details


def after_prune(folder: Path, work: Path, exp_dir: Path, scratch: Path) -> dict:
    """The full-file predict once more, on the pruned workdir."""
    again = predict(exp_dir, work, scratch / "full_after_prune", folder / "test.csv", None)
    result = {"predict": again}
    if "failed" not in again:
        result["compare"] = compare_full(Path(again["submission"]), exp_dir / "submission.csv")
    return result


# -- one dataset, the table, main -----------------------------------------------------------------


def bench_dataset(folder: Path) -> dict:
    name = folder.name
    work, scratch = TMP / name / "work", TMP / name / "predict"
    if scratch.exists():
        shutil.rmtree(scratch)
    print(f"== {name}: init + run all in {work}", flush=True)
    exp_dir, seconds = train(folder, work)
    sizes_before = sizes(work, exp_dir)
    print(f"== {name}: predict (full file, then a shuffled half)", flush=True)
    summary, details = agreement(folder, work, exp_dir, scratch)
    print(f"== {name}: cache prune --for-inference", flush=True)
    prune = cli("cache", "prune", "--for-inference", str(work))
    print(prune["stdout"].strip(), flush=True)
    sizes_after = sizes(work, exp_dir)
    pruned = after_prune(folder, work, exp_dir, scratch)
    summary.update(
        full_after_prune_max_abs_diff=pruned.get("compare", {}).get("max_abs_diff"),
        predict_after_prune_seconds=pruned["predict"]["seconds"],
        encoded_after_prune=pruned["predict"]["encoded_texts"],
        read_only_after_prune_ok=pruned["predict"]["read_only_ok"])
    return {
        "dataset": name,
        "rows_train": len(read_csv(folder / "train.csv")),
        "rows_test": len(read_csv(folder / "test.csv")),
        "seconds_run_all": round(seconds, 1),
        "sizes_before": sizes_before,
        "sizes_after": sizes_after,
        "agreement": summary,
        "prune": {"rc": prune["rc"], "stdout": prune["stdout"],
                  "stderr_tail": prune["stderr"][-2000:]},
        "after_prune": pruned,
        "predict_details": details,
    }


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def num(x: float | None) -> str:
    return "FAILED" if x is None else f"{x:.2e}"


def table(results: list[dict]) -> str:
    rows = [("dataset", "run all s", "workdir MB", "-> pruned", "features MB", "embeddings MB",
             "ft best MB", "full diff", "half diff", "pruned diff", "predict s", "encoded",
             "read-only")]
    for r in results:
        before, after, agr = r["sizes_before"], r["sizes_after"], r["agreement"]
        seconds = agr.get("predict_seconds", {})
        encoded = agr.get("encoded_texts", {})
        rows.append((
            r["dataset"], f"{r['seconds_run_all']:.0f}",
            mb(before["workdir"]), mb(after["workdir"]),
            mb(before["cache/features"]), mb(before["cache/embeddings"]),
            mb(before["finetune_best_total"]), num(agr.get("full_max_abs_diff")),
            num(agr.get("subset_max_abs_diff")), num(agr.get("full_after_prune_max_abs_diff")),
            "/".join(f"{seconds.get(k, float('nan')):.0f}" for k in ("full", "subset"))
            + f"/{agr['predict_after_prune_seconds']:.0f}",
            "/".join(str(encoded.get(k)) for k in ("full", "subset"))
            + f"/{agr['encoded_after_prune']}",
            str(agr.get("read_only_ok", False) and agr["read_only_after_prune_ok"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS),
                        help="folder names under ../shared/data (or paths)")
    args = parser.parse_args()
    folders = [Path(d) if Path(d).is_dir() else DATA / d for d in args.datasets]
    results = []
    for folder in folders:
        results.append(bench_dataset(folder.resolve()))
        RESULTS.mkdir(parents=True, exist_ok=True)  # written after each dataset: a crash keeps some
        (RESULTS / "run_size.json").write_text(json.dumps({"results": results}, indent=2) + "\n")
    print("\n" + table(results))
    print("(predict s and encoded: full file / shuffled half / full file after prune)")


if __name__ == "__main__":
    main()
