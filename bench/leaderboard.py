"""Real-data leaderboard: init -> run every stage -> score against held-out labels.

For each dataset folder (default: every folder of ../shared/data that has train.csv and
test_labels.csv) this runs, as a user would, with the embedded default models on CPU:

    hybridstack init <folder> -o <work>/<name>.toml --no-gpu
    hybridstack run <stage> -c <work>/<name>.toml      (each stage, timed)
    hybridstack score <submission.csv> <folder>/test_labels.csv

and scores every base model's test predictions the same way. Results go to
bench/results/leaderboard.json and bench/results/leaderboard.md.

    python bench/leaderboard.py [FOLDER ...] [--work DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
STAGES = ("tfidf", "embed", "finetune", "stack")


def hybridstack(*args: str) -> tuple[float, str]:
    """Run the CLI as a user would; return (seconds, stdout). Fails loudly on error."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hybridstack", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"hybridstack {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def bench_dataset(folder: Path, work: Path, overrides: list[str]) -> dict:
    from hybridstack.commands.compare import compare_rows

    name = folder.name
    config = work / f"{name}.toml"
    if not config.exists():
        hybridstack("init", str(folder), "-o", str(config), "--no-gpu", "--experiment", name)
    sets = [arg for item in overrides for arg in ("--set", item)]
    seconds = {}
    for stage in STAGES:
        seconds[stage], out = hybridstack("run", stage, "-c", str(config), *sets)
        print(out.strip(), flush=True)
    _, out = hybridstack("score", str(work / "runs" / name / "submission.csv"), str(folder / "test_labels.csv"))
    print(f"{name}: submission {out.strip()}")
    rows = compare_rows(work, experiments=[name], labels=folder / "test_labels.csv")
    models = [{"model": r["model"], "metric": r["metric"], "cv": r["cv"], "heldout": r.get("heldout"),
               "train_seconds": r["seconds"]} for r in rows]
    return {"dataset": name, "stage_seconds": {k: round(v, 1) for k, v in seconds.items()}, "models": models}


def markdown(results: list[dict], machine: str) -> str:
    lines = [f"Measured on {machine}. Reproduce: `python bench/leaderboard.py`.", ""]
    for res in results:
        stage_times = ", ".join(f"{k} {v:.0f}s" for k, v in res["stage_seconds"].items())
        lines += [f"**{res['dataset']}** (wall time per stage: {stage_times})", "",
                  "| model | metric | CV | held-out |", "|---|---|---|---|"]
        for m in res["models"]:
            heldout = "-" if m["heldout"] is None else f"{m['heldout']:.4f}"
            lines.append(f"| {m['model']} | {m['metric']} | {m['cv']:.4f} | {heldout} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "tmp" / "leaderboard")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override passed to every stage, e.g. cv.n_splits=3")
    args = parser.parse_args()
    folders = args.folders or sorted(p for p in DATA.iterdir()
                                     if (p / "train.csv").is_file() and (p / "test_labels.csv").is_file())
    args.work.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU")
    results = [bench_dataset(folder.resolve(), args.work, args.set) for folder in folders]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "leaderboard.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    table = markdown(results, machine)
    (RESULTS / "leaderboard.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
