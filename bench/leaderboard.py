"""Real-data leaderboard: init -> run every stage -> score against held-out labels.

For each dataset folder (default: every folder of ../shared/data that has train.csv and
test_labels.csv) this runs, as a user would, with the embedded default models on CPU:

    hybridstack init <folder> -o <work>/<name>.toml --no-gpu
    hybridstack run <stage> -c <work>/<name>.toml      (each stage, timed)
    hybridstack score <submission.csv> <folder>/test_labels.csv

and scores every base model's test predictions the same way. Results go to
bench/results/leaderboard.json and bench/results/leaderboard.md.

    python bench/leaderboard.py [FOLDER ...] [--work DIR] [--set KEY=VALUE ...]

``--lora`` adds a LoRA fine-tune of the same backbone (``finetune.method = "lora"``, model
folder ``<name>_lora``, the same rows, folds and epochs) after the stages, and fits the stack
again with it: the stack's score without and with the LoRA model, on the same rows, goes to
bench/results/leaderboard_lora.{json,md} (the plain leaderboard files are left alone).
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
    return {"dataset": name, "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "models": model_rows(rows)}


def model_rows(rows: list[dict]) -> list[dict]:
    """Each model's CV with the rows it was computed over, and its held-out score."""
    return [{"model": r["model"], "metric": r["metric"], "cv": r["cv"], "cv_rows": r["rows"],
             "cv_rows_basis": r["rows_basis"], "heldout": r.get("heldout"),
             "train_seconds": r["seconds"]} for r in rows]


# The LoRA run's own settings on top of the config's CPU fine-tune (adapters learn at higher rates).
LORA_SETTINGS = ["finetune.method=lora", "finetune.name=minilm_lora", "finetune.lr=1e-3",
                 "finetune.lora.r=16", "finetune.lora.alpha=32", "finetune.lora.dropout=0.05"]


def bench_lora(folder: Path, work: Path, overrides: list[str]) -> dict:
    """The stack without and with a LoRA fine-tune, scored on the same rows (run after
    :func:`bench_dataset` on the same ``work``)."""
    from hybridstack.commands.compare import compare_rows

    name = folder.name
    config = work / f"{name}.toml"
    labels = folder / "test_labels.csv"
    sets = [arg for item in overrides for arg in ("--set", item)]

    def stack_row() -> dict:
        rows = compare_rows(work, experiments=[name], labels=labels)
        return next({"cv": r["cv"], "heldout": r.get("heldout")} for r in rows
                    if r["model"] == "stack")

    without = stack_row()
    lora_sets = sets + [arg for item in LORA_SETTINGS for arg in ("--set", item)]
    seconds, out = hybridstack("run", "finetune", "-c", str(config), *lora_sets)
    print(out.strip(), flush=True)
    hybridstack("run", "stack", "-c", str(config), *sets)
    with_lora = stack_row()
    models = model_rows(compare_rows(work, experiments=[name], labels=labels))
    return {"dataset": name, "lora_seconds": round(seconds, 1), "lora_settings": LORA_SETTINGS,
            "stack_without_lora": without, "stack_with_lora": with_lora, "models": models}


def lora_markdown(results: list[dict], machine: str) -> str:
    lines = [f"Measured on {machine}. Reproduce: `python bench/leaderboard.py FOLDER --lora`.", ""]
    for res in results:
        w, wl = res["stack_without_lora"], res["stack_with_lora"]
        lines += [f"**{res['dataset']}** (LoRA fine-tune {res['lora_seconds']:.0f}s; "
                  f"{', '.join(res['lora_settings'])})", "",
                  "| model | metric | CV | held-out |", "|---|---|---|---|"]
        for m in res["models"]:
            heldout = "-" if m["heldout"] is None else f"{m['heldout']:.4f}"
            lines.append(f"| {m['model']} | {m['metric']} | {m['cv']:.4f} | {heldout} |")
        lines += ["", f"stack without the LoRA model: CV {w['cv']:.4f}, held-out "
                      f"{w['heldout']:.4f}; with it: CV {wl['cv']:.4f}, held-out {wl['heldout']:.4f}",
                  ""]
    return "\n".join(lines)


def markdown(results: list[dict], machine: str) -> str:
    lines = [f"Measured on {machine}. Reproduce: `python bench/leaderboard.py`.", ""]
    for res in results:
        stage_times = ", ".join(f"{k} {v:.0f}s" for k, v in res["stage_seconds"].items())
        lines += [f"**{res['dataset']}** (wall time per stage: {stage_times})", "",
                  "| model | metric | CV (rows) | held-out |", "|---|---|---|---|"]
        for m in res["models"]:
            heldout = "-" if m["heldout"] is None else f"{m['heldout']:.4f}"
            rows = f" ({m['cv_rows']:,})" if m.get("cv_rows") else ""
            lines.append(f"| {m['model']} | {m['metric']} | {m['cv']:.4f}{rows} | {heldout} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "tmp" / "leaderboard")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override passed to every stage, e.g. cv.n_splits=3")
    parser.add_argument("--lora", action="store_true",
                        help="also a LoRA fine-tune and the stack without/with it "
                             "(results: leaderboard_lora.{json,md})")
    args = parser.parse_args()
    folders = args.folders or sorted(p for p in DATA.iterdir()
                                     if (p / "train.csv").is_file() and (p / "test_labels.csv").is_file())
    args.work.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU")
    results = [bench_dataset(folder.resolve(), args.work, args.set) for folder in folders]
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.lora:
        lora = [bench_lora(folder.resolve(), args.work, args.set) for folder in folders]
        (RESULTS / "leaderboard_lora.json").write_text(
            json.dumps({"machine": machine, "results": lora}, indent=2))
        table = lora_markdown(lora, machine)
        (RESULTS / "leaderboard_lora.md").write_text(table + "\n")
        print("\n" + table)
        return
    (RESULTS / "leaderboard.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    table = markdown(results, machine)
    (RESULTS / "leaderboard.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
