"""``hybridstack compare``: one table of every experiment and model in a workdir.

Columns: experiment, model, CV metric (overall, per-fold mean and spread), the held-out
score when a labels file is given, training seconds, and the config values that differ
between the experiments compared. Sorted by the metric (best first).
"""

from __future__ import annotations

import argparse
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hybridstack.errors import HybridstackError
from hybridstack.runs import DONE_FILE, ExperimentDir, ModelDir, read_json


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data if not isinstance(data, list) else str(data)}


def varied_values(run_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """Per experiment, the config values that are not the same in every experiment."""
    flat = {}
    for run_dir in run_dirs:
        config = run_dir / "config.toml"
        values = _flatten(tomllib.loads(config.read_text())) if config.is_file() else {}
        values.pop("experiment", None)
        flat[run_dir.name] = values
    keys = sorted({k for values in flat.values() for k in values})
    varied = [k for k in keys if len({repr(v.get(k)) for v in flat.values()}) > 1]
    return {name: {k: values.get(k) for k in varied} for name, values in flat.items()}


def _model_dirs(exp: ExperimentDir) -> list[ModelDir]:
    models = exp.finished_models()
    if (exp.stack.path / DONE_FILE).is_file():
        models.append(exp.stack)
    return models


def compare_rows(workdir: str | Path, experiments: list[str] | None = None,
                 labels: str | Path | None = None) -> list[dict[str, Any]]:
    runs = Path(workdir) / "runs"
    if not runs.is_dir():
        raise HybridstackError(f"no experiments under {runs}: run a stage first or pass the workdir")
    run_dirs = sorted(p for p in runs.iterdir() if p.is_dir() and (experiments is None or p.name in experiments))
    varied = varied_values(run_dirs)
    rows = []
    for run_dir in run_dirs:
        exp = ExperimentDir(run_dir)
        heldout = _heldout_scorer(run_dir, labels) if labels else None
        for model in _model_dirs(exp):
            scores = model.load_scores()
            per_fold = list(scores.get("per_fold", {}).values())
            row = {
                "experiment": run_dir.name,
                "model": model.name,
                "metric": scores["metric_name"],
                "cv": scores["overall"],
                "rows": scores.get("rows_validated"),
                # whose validated rows those are (the stack: the models of its level)
                "rows_basis": ",".join(scores.get("rows_basis", [model.name])),
                "fold_mean": float(np.mean(per_fold)) if per_fold else float("nan"),
                "fold_std": float(np.std(per_fold)) if len(per_fold) > 1 else float("nan"),
                "seconds": scores.get("seconds"),
                "greater_is_better": scores["greater_is_better"],
            }
            if heldout is not None and model.test_path.is_file():
                row["heldout"] = heldout(model.load_test())
            row.update(varied.get(run_dir.name, {}))
            rows.append(row)
    # ranked only among scores over the same number of rows (a stack level 2 over fold 0's
    # rows is not put above models scored over every row)
    rows.sort(key=lambda r: (r["metric"], -(r["rows"] or 0),
                             -r["cv"] if r["greater_is_better"] else r["cv"]))
    return rows


def _heldout_scorer(run_dir: Path, labels: str | Path):
    """A function scoring a test.npy of this experiment against the labels file."""
    from hybridstack.commands.score import score_submission
    from hybridstack.config import load_config
    from hybridstack.tables import read_table
    from hybridstack.tasks import make_task

    cfg = load_config(run_dir / "config.toml")
    dataset = read_json(run_dir / "dataset.json")
    task = make_task(cfg, classes=dataset["label_names"])
    test = task.parse(read_table(cfg.data.test, cfg.data.delimiter, cfg.data.column_names), labelled=False)

    def score(test_pred: np.ndarray) -> float:
        sub = pd.DataFrame(test_pred, columns=task.label_names)
        sub.insert(0, cfg.task.id_column, test.ids)
        with tempfile.TemporaryDirectory() as tmp:
            sub.to_csv(Path(tmp) / "sub.csv", index=False)
            return score_submission(Path(tmp) / "sub.csv", labels, kind=task.kind,
                                    id_column=cfg.task.id_column).value

    return score


def format_rows(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    if not rows:
        return "(no finished models)"
    frame = pd.DataFrame(rows).drop(columns=["greater_is_better"])
    if fmt == "csv":
        return frame.to_csv(index=False)
    frame = frame.round(5)
    if fmt == "markdown":
        return frame.to_markdown(index=False)
    return frame.to_string(index=False)


def add_parser(sub) -> None:
    parser = sub.add_parser("compare", help="a table of every experiment and model in a workdir")
    parser.add_argument("workdir", nargs="?", default=".", help="folder holding runs/ (default: .)")
    parser.add_argument("--experiment", action="append", help="only these experiments")
    parser.add_argument("--labels", help="test labels CSV: adds the held-out score of each model")
    parser.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    print(format_rows(compare_rows(args.workdir, args.experiment, args.labels), args.format))
