"""How each stage's time, memory and disk grow with the train rows, on Jigsaw- and LMSYS-shaped data.

For each dataset (jigsaw, lmsys) and each n of a doubling ladder (default 10k .. 160k train
rows; test rows in the competition's ratio, bench/scale_data.py), in a fresh folder
<workdir>/<dataset>/n<n>/ (default workdir /tmp/hybridstack-bench-scale; nothing under the
repository) this runs, as a user would:

    python bench/scale_data.py <dataset> <n> data/            (made in-process, not timed)
    hybridstack init data --no-gpu -o detected.toml           (checked: detects the task)
    hybridstack init data --recipe jigsaw|lmsys -o cfg.toml   (the config that runs)
    hybridstack run <stage> -c cfg.toml --set ...             for tfidf, embed, finetune, stack
    hybridstack predict runs/<dataset> --input data/test.csv --submission predict/submission.csv
        --cache-dir predict/cache

and records per stage its wall time, the peak RSS of its process tree (the sum over the
process and its descendants, sampled every 100 ms, and never below the largest single process's
ru_maxrss from wait4) and the bytes it added under runs/ and cache/ (predict: under its
--cache-dir and submission). The packaged recipe runs as it is, but for:

* embed: ``embed.model`` is a tiny randomly initialised BERT (2 layers, hidden 32, MiniLM's
  WordPiece tokenizer) as a sentence-transformers folder with a dense layer to 384 dimensions
  (e5-small-v2's width), written once to <workdir>/models. Encoding on a CPU is not what this
  measures (it is linear and GPU-bound on Kaggle); the cache, kNN, length features, the
  LightGBM and MLP heads and the cache reads are the real ones, at 384 dimensions.
* finetune: the same tiny BERT as backbone, with the recipe's fold 0, max_length, batch size
  and swap augmentation, for a bounded number of steps: ``finetune.epochs=1`` and
  ``finetune.max_train_rows=--ft-train-rows`` (default 8000: 1000 steps at batch 8, lmsys
  x2 for the A/B swap). The subsample is drawn after tokenising, so tokenising train and test,
  the token store and its memory, collation, and predicting the held-out fold and the test
  are all at full size; the number of training steps is not.
* the embed heads' iterations are bounded, as the fine-tune's: LightGBM at most ``--lgbm-rounds``
  (default 50; the recipe: up to 2000, early-stopped) on 1 thread, the MLP at most
  ``--mlp-epochs`` (default 10; recipe: up to 100). When to stop is decided by the signal in
  the embeddings, which a random encoder does not have; the cost per round or epoch (and
  the kNN features around them) is what grows with n.

Then it fits each stage's growth exponent (least squares of log seconds on log n) and writes

    OUT (default bench/results/scale.json):
      {"<dataset>": {"rows": [n, ...], "test_rows": [...],
                     "stages": {"<stage>": {"seconds": [...], "peak_rss_bytes": [...],
                                            "bytes_written": [...], "exponent": x}}, ...}}
    OUT with .png: time and peak RSS against n, log-log, one line per stage and dataset

and prints the table. The ladder is resumable: each finished rung writes
<OUT's folder>/<OUT's stem>_rungs/<dataset>-<n>.json (with the bench settings it ran with),
and a re-run skips every rung whose JSON has the same settings (``--force`` reruns them), so
the ladder can be completed across several sittings (``--no-run`` only rebuilds OUT and the
plot from the finished rungs). A failed stage is recorded in the rung's
JSON (command, exit code, log tail) and the rung is retried on the next run.

    python bench/bench_scale.py [--sizes 10000,20000,40000,80000,160000] [--datasets jigsaw lmsys]
        [--out bench/results/scale.json] [--workdir /tmp/hybridstack-bench-scale] [--keep-work]
        [--repeat-prompts 0.0] [--seed 0] [--force | --no-run]
    make bench-scale [SIZES=10000,20000] [OUT=path.json]

CI smoke: ``make bench-scale-smoke`` (1,000 and 2,000 rows of both datasets with 3 folds,
20k-feature TF-IDF vocabularies, 128-token sequences, 10 LightGBM rounds, 3 MLP epochs and a
400-row fine-tune, then ``--no-run``, which fails unless every rung finished). Its stages took
about 330 CPU-seconds with 5 folds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import scale_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATASETS = ("jigsaw", "lmsys")
STAGES = ("tfidf", "embed", "finetune", "stack", "predict")
DEFAULT_SIZES = "10000,20000,40000,80000,160000"
DEFAULT_WORKDIR = Path("/tmp/hybridstack-bench-scale")
POLL_S = 0.1
BENCH_VERSION = 2  # bump when a rung's numbers would no longer compare with older rungs'
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 512, "output_dim": 384, "tokenizer": "embedded:minilm", "seed": 0}
# --set overrides of the recipe, besides the two model folders and the head bounds (flags)
OVERRIDES = ["finetune.epochs=1", "embed.lgbm.num_threads=1"]
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# -- the tiny models ------------------------------------------------------------------------------


def write_tiny_models(folder: Path) -> tuple[Path, Path]:
    """A tiny BERT backbone (for the fine-tune) and a sentence-transformers encoder around it
    with a dense layer to 384 dimensions (for embed), both with MiniLM's tokenizer; written once."""
    backbone, encoder = folder / "tiny-bert", folder / "tiny-encoder-384"
    if (backbone / "config.json").is_file() and (encoder / "modules.json").is_file():
        return backbone, encoder
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hybridstack.models import resolve_model

    try:  # sentence-transformers 6 (5.x has only the old name)
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(TINY["tokenizer"], "bench")))
    torch.manual_seed(TINY["seed"])
    config = BertConfig(vocab_size=tokenizer.vocab_size, **{k: TINY[k] for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings")})
    tmp = folder / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    BertModel(config).save_pretrained(tmp / "tiny-bert")
    tokenizer.save_pretrained(tmp / "tiny-bert")
    word = models.Transformer(str(tmp / "tiny-bert"), max_seq_length=TINY["max_position_embeddings"])
    dense = models.Dense(TINY["hidden_size"], TINY["output_dim"], activation_function=torch.nn.Identity())
    SentenceTransformer(modules=[word, models.Pooling(TINY["hidden_size"], "mean"), dense,
                                 models.Normalize()], device="cpu").save(str(tmp / "tiny-encoder-384"))
    for name in ("tiny-bert", "tiny-encoder-384"):
        shutil.rmtree(folder / name, ignore_errors=True)
        (tmp / name).rename(folder / name)
    tmp.rmdir()
    return backbone, encoder


# -- measuring one command ------------------------------------------------------------------------


def tree_rss(proc: psutil.Process) -> int:
    """RSS of ``proc`` and all its descendants (bytes); processes that just ended count 0."""
    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in members:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(args: list[str], log: Path, cwd: Path) -> dict:
    """Run ``args``, output to ``log``; wall seconds, peak tree RSS, exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **ENV})
        watched, peak = psutil.Process(proc.pid), 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(watched))
            time.sleep(POLL_S)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    # wait4's ru_maxrss (KiB): the largest single process of the tree, so no spike is missed
    return {"seconds": round(seconds, 2), "peak_rss_bytes": max(peak, usage.ru_maxrss * 1024),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2), "rc": proc.returncode}


def du(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 if absent)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def hybridstack(*args: str) -> list[str]:
    return [sys.executable, "-m", "hybridstack", *args]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# -- one rung -------------------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> dict:
    """What a rung's numbers depend on besides n and the machine (a finished rung is reused
    only when these are the same)."""
    return {"bench_version": BENCH_VERSION, "generator_version": scale_data.GENERATOR_VERSION,
            "seed": args.seed, "repeat_prompts": args.repeat_prompts, "tiny_model": TINY,
            "overrides": overrides(args)}


def overrides(args: argparse.Namespace) -> list[str]:
    return [*OVERRIDES, f"finetune.max_train_rows={args.ft_train_rows}",
            f"embed.lgbm.n_estimators={args.lgbm_rounds}",
            f"embed.mlp.max_epochs={args.mlp_epochs}", *args.set]


def run_rung(dataset: str, n: int, args: argparse.Namespace, models: tuple[Path, Path]) -> dict:
    """Generate, init, run every stage and predict in <workdir>/<dataset>/n<n>; the rung's record."""
    work = args.workdir / dataset / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    data, logs = work / "data", work / "logs"
    generation = scale_data.write(dataset, data, n, seed=args.seed,
                                  repeat_prompts=args.repeat_prompts if dataset == "lmsys" else 0.0)
    record: dict = {"dataset": dataset, "n_train": n, "n_test": generation["test_rows"],
                    "load_avg_before": [round(x, 2) for x in os.getloadavg()],
                    "settings": settings(args), "generation": generation,
                    "data_bytes": du(data), "stages": {}}
    # init without a recipe detects the task from the columns; the run uses the recipe's config
    config = work / "cfg.toml"
    want = "kind pairwise" if dataset == "lmsys" else "kind multilabel"
    record["init"] = {}
    for name, extra in (("detect", ["--no-gpu", "-o", str(work / "detected.toml")]),
                        ("recipe", ["--recipe", dataset, "-o", str(config)])):
        init = subprocess.run(hybridstack("init", str(data), "--experiment", dataset, *extra),
                              capture_output=True, text=True, env={**os.environ, **ENV}, cwd=work)
        kind_line = next((line for line in init.stdout.splitlines() if line.startswith("kind ")), "")
        record["init"][name] = {"rc": init.returncode, "kind_line": kind_line}
        if init.returncode != 0 or not kind_line.startswith(want):
            record["failed"] = {"stage": f"init ({name})", "rc": init.returncode,
                                "log_tail": f"wanted {want!r}\n" + (init.stdout + init.stderr)[-3000:]}
            return record
    # what the numbers also depend on, read back from the config that runs (older rungs lack it:
    # the LMSYS ladder's TF-IDF ran at the recipe's C = 4, README "Scale")
    record["tfidf_models"] = tomllib.loads(config.read_text()).get("tfidf", {}).get("models")
    backbone, encoder = models
    sets = [a for item in [f"embed.model={encoder}", f"finetune.model={backbone}", *overrides(args)]
            for a in ("--set", item)]
    exp_dir = work / "runs" / dataset
    predict_dir = work / "predict"
    for stage in STAGES:
        if stage == "predict":
            cmd = hybridstack("predict", str(exp_dir), "--input", str(data / "test.csv"),
                              "--submission", str(predict_dir / "submission.csv"),
                              "--cache-dir", str(predict_dir / "cache"))
            before = du(predict_dir)
        else:
            cmd = hybridstack("run", stage, "-c", str(config), *sets)
            before = du(work / "runs") + du(work / "cache")
        print(f"  {dataset} n={n}: {stage} ...", end="", flush=True)
        result = measure(cmd, logs / f"{stage}.log", work)
        after = du(predict_dir) if stage == "predict" else du(work / "runs") + du(work / "cache")
        result["bytes_written"] = after - before
        if stage != "predict":
            result["runs_bytes"], result["cache_bytes"] = du(work / "runs"), du(work / "cache")
        record["stages"][stage] = result
        print(f" {result['seconds']:.1f}s, peak {result['peak_rss_bytes'] / 2**20:.0f} MiB"
              + ("" if result["rc"] == 0 else f", FAILED (exit {result['rc']}, see {logs / (stage + '.log')})"),
              flush=True)
        if result["rc"] != 0:
            record["failed"] = {"stage": stage, "rc": result["rc"], "command": " ".join(cmd),
                                "log_tail": tail(logs / f"{stage}.log")}
            return record
    submission = predict_dir / "submission.csv"
    with submission.open() as fh:
        record["predict_rows"] = sum(1 for _ in fh) - 1
    if record["predict_rows"] != record["n_test"]:
        record["failed"] = {"stage": "predict", "rc": 0,
                            "log_tail": f"{record['predict_rows']} submission rows for {record['n_test']} test rows"}
    record["workdir_bytes"] = du(work)
    return record


def rung_path(out: Path, dataset: str, n: int) -> Path:
    return out.parent / f"{out.stem}_rungs" / f"{dataset}-{n}.json"


def load_rung(path: Path, want: dict) -> dict | None:
    """A finished rung's record with the same settings, else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("settings") != want or "failed" in record:
        return None
    return record


# -- the fit, the JSON, the plot, the table -------------------------------------------------------


def exponent(ns: list[int], values: list[float | None]) -> float | None:
    """Slope of log(value) on log(n) by least squares (None with fewer than 2 usable points)."""
    points = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v is not None and v > 0]
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return round(slope, 3)


def summarize(rungs: dict[str, list[dict]]) -> dict:
    out = {}
    for dataset, records in rungs.items():
        records = sorted(records, key=lambda r: r["n_train"])
        rows = [r["n_train"] for r in records]
        stages = {}
        for stage in STAGES:
            got = [r["stages"].get(stage, {}) for r in records]
            seconds = [g.get("seconds") for g in got]
            cpu = [g.get("cpu_seconds") for g in got]
            stages[stage] = {"seconds": seconds,
                             "peak_rss_bytes": [g.get("peak_rss_bytes") for g in got],
                             "bytes_written": [g.get("bytes_written") for g in got],
                             "exponent": exponent(rows, seconds),
                             # CPU seconds of the tree (user + system): less hurt by a shared machine
                             "cpu_seconds": cpu, "exponent_cpu": exponent(rows, cpu)}
        out[dataset] = {"rows": rows, "test_rows": [r["n_test"] for r in records], "stages": stages,
                        "settings": records[0]["settings"] if records else None,
                        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                    "memory_bytes": psutil.virtual_memory().total}}
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = dict(zip(STAGES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = dict(zip(DATASETS, ("-", "--")))
    for dataset, res in summary.items():
        for stage, s in res["stages"].items():
            label = f"{dataset} {stage}" + ("" if s["exponent"] is None else f" (n^{s['exponent']:.2f})")
            pts = [(n, t) for n, t in zip(res["rows"], s["seconds"]) if t is not None]
            if pts:
                ax_t.plot(*zip(*pts), styles.get(dataset, ":"), marker="o", color=colors[stage], label=label)
            pts = [(n, m / 2**20) for n, m in zip(res["rows"], s["peak_rss_bytes"]) if m is not None]
            if pts:
                ax_m.plot(*zip(*pts), styles.get(dataset, ":"), marker="o", color=colors[stage],
                          label=f"{dataset} {stage}")
    for ax, title, unit in ((ax_t, "wall time per stage", "seconds"),
                            (ax_m, "peak RSS of the process tree", "MiB")):
        ax.set(xscale="log", yscale="log", xlabel="train rows", ylabel=unit, title=title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7, ncol=2)
    fig.suptitle("hybridstack stages vs train rows (jigsaw solid, lmsys dashed; tiny encoder and "
                 "backbone, a bounded number of fine-tune steps)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(summary: dict) -> str:
    rows = [("dataset", "stage", "rows", "test rows", "seconds", "cpu s", "peak RSS MiB", "written MiB",
             "exponent", "exp. cpu")]
    for dataset, res in summary.items():
        for stage, s in res["stages"].items():
            for i, n in enumerate(res["rows"]):
                last = i == len(res["rows"]) - 1
                rows.append((dataset, stage, str(n), str(res["test_rows"][i]),
                             num(s["seconds"][i]), num(s["cpu_seconds"][i]),
                             mib(s["peak_rss_bytes"][i]), mib(s["bytes_written"][i]),
                             num(s["exponent"], 2) if last else "", num(s["exponent_cpu"], 2) if last else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if j >= 2 else c.ljust(w) for j, (c, w) in
                               enumerate(zip(r, widths))).rstrip() for r in rows)


# -- main -----------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    sizes = sorted({int(s) for s in text.replace(" ", "").split(",") if s})
    if not sizes or sizes[0] < 100:
        raise argparse.ArgumentTypeError(f"--sizes: train rows >= 100, comma-separated (got {text!r})")
    return sizes


def ladder(dataset: str, sizes: list[int]) -> list[int]:
    """``sizes`` with every rung above the competition's train rows replaced by that size
    (LMSYS has 57,477: the default ladder's 80k and 160k both become one full-size rung)."""
    full = scale_data.competition_train_rows(dataset)
    return sorted({min(n, full) for n in sizes})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                        help=f"train rows per rung, comma-separated (default {DEFAULT_SIZES})")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="generated data, runs and the tiny models (outside the repository)")
    parser.add_argument("--keep-work", action="store_true", help="keep each rung's folder (default: removed)")
    parser.add_argument("--repeat-prompts", type=float, default=0.0,
                        help="lmsys: share of rows with an earlier row's prompt (LMSYS: ~0.1; default unique)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lgbm-rounds", type=int, default=50,
                        help="embed.lgbm.n_estimators (recipe: up to 2000, early-stopped; default 50)")
    parser.add_argument("--mlp-epochs", type=int, default=10,
                        help="embed.mlp.max_epochs (recipe: up to 100, early-stopped; default 10)")
    parser.add_argument("--ft-train-rows", type=int, default=8000,
                        help="finetune.max_train_rows: the fine-tune's bounded steps (default 8000 rows)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further override of the recipe for every stage (repeatable), e.g. "
                             "the CI smoke's smaller TF-IDF vocabularies; recorded in the rungs")
    parser.add_argument("--force", action="store_true", help="rerun finished rungs too")
    parser.add_argument("--no-run", action="store_true",
                        help="run nothing: rebuild OUT and the plot from the finished rungs' JSON "
                             "(exit 1 if one of the ladder's rungs has not finished)")
    args = parser.parse_args(argv)
    if args.force and args.no_run:
        parser.error("--force reruns finished rungs and --no-run runs none: pick one")
    args.workdir = args.workdir.resolve()
    if args.workdir.is_relative_to(ROOT):
        parser.error(f"--workdir {args.workdir} is inside the repository; use a folder under /tmp")
    args.workdir.mkdir(parents=True, exist_ok=True)
    want = settings(args)
    started = time.perf_counter()
    models = None
    rungs: dict[str, list[dict]] = {d: [] for d in args.datasets}
    failed = []
    for dataset in args.datasets:
        for n in ladder(dataset, args.sizes):
            path = rung_path(args.out, dataset, n)
            record = None if args.force else load_rung(path, want)
            if record is not None:
                print(f"{dataset} n={n}: finished earlier ({path}), skipped", flush=True)
            elif args.no_run:
                failed.append(f"{dataset} n={n}: not finished (no {path} with these settings)")
                continue
            else:
                print(f"{dataset} n={n} ({scale_data.test_rows_for(dataset, n)} test rows) in "
                      f"{args.workdir / dataset / f'n{n}'}", flush=True)
                models = models or write_tiny_models(args.workdir / "models")
                record = run_rung(dataset, n, args, models)
                record["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                                     "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record, indent=2) + "\n")
                if not args.keep_work:
                    shutil.rmtree(args.workdir / dataset / f"n{n}", ignore_errors=True)
            if "failed" in record:
                failed.append(f"{dataset} n={n}: {record['failed']['stage']} (exit {record['failed']['rc']})")
                print(f"{dataset} n={n} FAILED at {record['failed']['stage']}:\n"
                      f"{record['failed']['log_tail'][-1500:]}", flush=True)
                continue  # recorded in its rung JSON and retried next time, left out of the fit
            rungs[dataset].append(record)
    summary = summarize(rungs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out.with_suffix(".png"))
    print("\n" + table(summary))
    print(f"\n-> {args.out} and {args.out.with_suffix('.png')} (rungs: {rung_path(args.out, '*', 0).parent}); "
          f"{time.perf_counter() - started:.0f}s")
    for line in failed:
        print(f"FAILED {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
