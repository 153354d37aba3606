"""The experiment report: a leaderboard, the blend, and diagnostic plots of the final model.

``write_report(run_dir)`` writes ``report/report.md`` and PNG plots (matplotlib's Agg
canvas, no display needed); ``hybridstack report runs/<experiment>`` does the same from
the command line. The final model is the stack when it is DONE, else the best base model.
Its plots use OOF predictions only, so they show held-out behaviour.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from hybridstack.errors import HybridstackError
from hybridstack.experiment import Experiment, reopen_experiment
from hybridstack.runs import ExperimentDir, ModelDir, read_json, write_text, write_with

REPORT_FILE = "report.md"
SCORES_PLOT = "scores.png"
CALIBRATION_PLOT = "calibration.png"
ROC_PLOT = "roc.png"
CONFUSION_PLOT = "confusion.png"
STACK_NAME = "stack"
_CALIBRATION_BINS = 10


@dataclass
class Entry:
    """One leaderboard row: a base model or the stack."""

    name: str
    scores: dict[str, Any]
    folder: ModelDir

    same_rows: float | None = None  # the metric over the rows every entry is compared on

    @property
    def overall(self) -> float:
        return float(self.scores["overall"])

    @property
    def compared(self) -> float:
        """What the leaderboard ranks by: the same-rows score when the entry has one."""
        return self.overall if self.same_rows is None else self.same_rows


def score_on_same_rows(task: Any, Y: np.ndarray, oofs: dict[str, np.ndarray],
                       rows: np.ndarray) -> dict[str, float | None]:
    """Each model's metric over exactly ``rows`` (None for a model that lacks some of them):
    scores over different rows are never put side by side."""
    out: dict[str, float | None] = {}
    for name, oof in oofs.items():
        covered = ~np.isnan(oof).any(axis=1)
        out[name] = float(task.score(Y[rows], oof[rows])) if covered[rows].all() else None
    return out


def write_report(run_dir: str | Path, exp: Experiment | None = None) -> Path:
    """Write ``<run_dir>/report/report.md`` and its PNG plots; return the report path.

    Parameters
    ----------
    run_dir : an experiment folder, ``<workdir>/runs/<experiment>``.
    exp : the experiment already opened (``run all``); else it is reopened read-only.
    """
    exp_dir = ExperimentDir(Path(run_dir).resolve())
    if not exp_dir.config_path.is_file():
        raise HybridstackError(
            f"{run_dir} is not an experiment folder (no config.toml); give runs/<experiment>")
    entries = _entries(exp_dir)
    exp = exp if exp is not None else reopen_experiment(exp_dir.path)
    final = _final_entry(exp, entries)
    oof = final.folder.load_oof()
    rows = ~np.isnan(oof).any(axis=1)
    Y, P = exp.train.Y[rows], oof[rows]
    same = score_on_same_rows(exp.task, exp.train.Y, {e.name: e.folder.load_oof() for e in entries},
                              rows)
    for entry in entries:
        entry.same_rows = same[entry.name]

    out = exp_dir.report_dir
    _save(_scores_figure(exp, entries, final), out / SCORES_PLOT)
    _save(_calibration_figure(exp, Y, P, final.name), out / CALIBRATION_PLOT)
    if exp.task.kind == "multilabel":
        _save(_roc_figure(exp, Y, P, final.name), out / ROC_PLOT)
        plots = [ROC_PLOT, CALIBRATION_PLOT, SCORES_PLOT]
    else:
        _save(_confusion_figure(exp, Y, P, final.name), out / CONFUSION_PLOT)
        plots = [CONFUSION_PLOT, CALIBRATION_PLOT, SCORES_PLOT]
    path = out / REPORT_FILE
    write_text(path, _markdown(exp, entries, final, plots))
    print(f"report -> {path}")
    return path


# -- inputs -----------------------------------------------------------------------------


def _entries(exp_dir: ExperimentDir) -> list[Entry]:
    models = [Entry(m.name, m.load_scores(), m) for m in exp_dir.finished_models()]
    if exp_dir.stack.is_done():
        models.append(Entry(STACK_NAME, exp_dir.stack.load_scores(), exp_dir.stack))
    if not models:
        raise HybridstackError(f"{exp_dir.path}: no finished model to report on; run a stage first")
    return models


def _final_entry(exp: Experiment, entries: list[Entry]) -> Entry:
    stack = [e for e in entries if e.name == STACK_NAME]
    if stack:
        return stack[0]
    best = entries[0]
    for entry in entries[1:]:
        if exp.task.is_better(entry.overall, best.overall):
            best = entry
    return best


def _ranked(exp: Experiment, entries: list[Entry]) -> list[Entry]:
    """Entries scored on the same rows first (best first), then the others (own rows)."""
    sign = -1.0 if exp.task.greater_is_better else 1.0
    return sorted(entries, key=lambda e: (e.same_rows is None, sign * e.compared))


# -- plots ------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # render with Agg whatever the global matplotlib backend is
    fig.tight_layout()
    write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


def _scores_figure(exp: Experiment, entries: list[Entry], final: Entry) -> Figure:
    # only scores over the same rows are drawn side by side
    ranked = [e for e in _ranked(exp, entries) if e.same_rows is not None][::-1]
    values = np.array([e.same_rows for e in ranked])
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(ranked)))
    ax = fig.add_subplot()
    colors = ["tab:orange" if e.name == final.name else "tab:blue" for e in ranked]
    ax.barh([e.name for e in ranked], values, color=colors)
    spread = max(values.max() - values.min(), 1e-3)
    ax.set_xlim(values.min() - spread, values.max() + 0.5 * spread)  # differences stay visible
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:.4f}", va="center", fontsize=8)
    direction = "higher" if exp.task.greater_is_better else "lower"
    n_rows = final.scores.get("rows_validated", "?")
    ax.set_xlabel(f"CV {exp.task.metric_name} over the same {n_rows} train rows "
                  f"({direction} is better)")
    ax.set_title("Model scores (OOF; stack: nested CV, choice inside the nest)")
    return fig


def _calibration_figure(exp: Experiment, Y: np.ndarray, P: np.ndarray, name: str) -> Figure:
    fig = Figure(figsize=(6, 5.5))
    ax = fig.add_subplot()
    for j, label in enumerate(exp.task.label_names):
        if len(np.unique(Y[:, j])) < 2:
            continue  # no positives (or no negatives): nothing to calibrate against
        CalibrationDisplay.from_predictions(Y[:, j], P[:, j], n_bins=_CALIBRATION_BINS,
                                            strategy="quantile", name=label, ax=ax,
                                            ref_line=j == 0)
    ax.set_title(f"Reliability of {name} (OOF, {_CALIBRATION_BINS} quantile bins per column)")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _roc_figure(exp: Experiment, Y: np.ndarray, P: np.ndarray, name: str) -> Figure:
    labels = exp.task.label_names
    n_cols = min(3, len(labels))
    n_rows = -(-len(labels) // n_cols)
    fig = Figure(figsize=(4 * n_cols, 3.8 * n_rows))
    for j, label in enumerate(labels):
        ax = fig.add_subplot(n_rows, n_cols, j + 1)
        if len(np.unique(Y[:, j])) < 2:
            ax.set_title(f"{label}: one class only, no ROC")
            continue
        RocCurveDisplay.from_predictions(Y[:, j], P[:, j], name=name, ax=ax, plot_chance_level=True)
        ax.set_title(f"{label} ({int(Y[:, j].sum())} positive)")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Per-label ROC curves of {name} (OOF)")
    return fig


def _confusion_figure(exp: Experiment, Y: np.ndarray, P: np.ndarray, name: str) -> Figure:
    fig = Figure(figsize=(5.5, 4.8))
    ax = fig.add_subplot()
    labels = exp.task.label_names
    ConfusionMatrixDisplay.from_predictions(
        Y.argmax(1), P.argmax(1), labels=list(range(len(labels))), normalize="true",
        display_labels=labels, values_format=".2f", ax=ax, xticks_rotation=30)
    ax.set_title(f"Confusion matrix of {name} (OOF, rows sum to 1)")
    return fig


# -- markdown ---------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _leaderboard(exp: Experiment, entries: list[Entry], final: Entry) -> str:
    n_splits = exp.n_splits
    rows = []
    for entry in _ranked(exp, entries):
        per_fold = entry.scores.get("per_fold", {})
        folds = [f"{per_fold[str(k)]:.4f}" if str(k) in per_fold else "-" for k in range(n_splits)]
        marker = " (final)" if entry.name == final.name else ""
        same = "-" if entry.same_rows is None else f"{entry.same_rows:.5f}"
        rows.append([f"{entry.name}{marker}", same, f"{entry.overall:.5f}",
                     str(entry.scores.get("rows_validated", "-")), *folds,
                     f"{float(entry.scores.get('seconds', 0.0)):.1f}"])
    n_rows = final.scores.get("rows_validated", "?")
    header = ["model", f"{exp.task.metric_name} on the final's {n_rows} rows",
              f"{exp.task.metric_name} on its own rows", "own rows",
              *[f"fold {k}" for k in range(n_splits)], "seconds"]
    return _table(header, rows)


def _stack_sections(exp: Experiment, stack_scores: dict[str, Any]) -> list[str]:
    stack_dir = exp.dir.stack.path
    level = stack_scores.get("level", 1)
    basis = ", ".join(stack_scores.get("rows_basis", [])) or "every stacked model"
    parts = ["## Stack", "",
             f"Chosen: **{stack_scores['chosen']}** (level {level} wrote the submission): "
             f"{stack_scores['note']}.", "",
             f"Score {stack_scores['overall']:.5f} over {stack_scores['rows_validated']} rows "
             f"(the rows {basis} were validated on; nested CV folds: "
             f"{stack_scores['stacking_folds']}), with the choice of candidate made inside each "
             "outer fold on inner folds of the other rows.", ""]
    sign = 1.0 if stack_scores["greater_is_better"] else -1.0
    levels = stack_scores.get("levels", {"1": stack_scores})
    for name, lvl in sorted(levels.items()):
        candidates = sorted(lvl["candidates"].items(), key=lambda kv: -sign * kv[1]["overall"])
        parts += [f"Level {name}: {', '.join(lvl.get('models', []))} over "
                  f"{lvl['rows_validated']} rows; nested-CV score of every candidate (each "
                  "chosen on these same rows, so the best of them is optimistic; single models "
                  "pass through unchanged):", "",
                  _table(["candidate", stack_scores["metric_name"], "rows", "seconds"],
                         [[cand, f"{c['overall']:.5f}", str(c.get("rows_validated", lvl["rows_validated"])),
                           f"{c['seconds']:.1f}"] for cand, c in candidates]),
                  ""]
    weights = read_json(stack_dir / "weights.json")
    parts += [f"### Blend weights ({weights['method']}: {weights['kind']})", "",
              _table(["model", "weight"], [[m, f"{w:.3f}"] for m, w in weights["weights"].items()]),
              ""]
    if "temperature" in weights:
        parts += ["Temperature: " + ", ".join(f"{t:.3f}" for t in weights["temperature"]), ""]
    if "per_label_weights" in weights:
        rows = [[label, *(f"{w:.3f}" for w in row)]
                for label, row in zip(exp.task.label_names, weights["per_label_weights"])]
        parts += ["Per-label weights:", "", _table(["label", *weights["models"]], rows), ""]
    thresholds_path = stack_dir / "thresholds.json"
    if thresholds_path.is_file():
        thresholds = read_json(thresholds_path)
        rows = [[label, f"{t['threshold']:.3f}", f"{t['precision']:.3f}", f"{t['recall']:.3f}",
                 f"{t['f1']:.3f}", str(t["support"])]
                for label in exp.task.label_names if (t := thresholds[label])]
        parts += ["### Decision thresholds (tuned on OOF for F1, precision/recall/F1 on folds "
                  "they were not tuned on; the submission keeps probabilities)",
                  "", _table(["label", "threshold", "precision", "recall", "F1", "positives"], rows),
                  ""]
    return parts


def _markdown(exp: Experiment, entries: list[Entry], final: Entry, plots: list[str]) -> str:
    n_test = 0 if exp.test is None else len(exp.test)
    parts = [f"# Report: {exp.cfg.experiment}", "",
             f"Task: {exp.task.kind}, metric {exp.task.metric_name} "
             f"({'higher' if exp.task.greater_is_better else 'lower'} is better); "
             f"{len(exp.train)} train rows, {n_test} test rows, {exp.n_splits} folds.", "",
             "## Leaderboard", "",
             "Base models: out-of-fold score. Stack: nested-CV score on the same folds.", "",
             _leaderboard(exp, entries, final), ""]
    if final.name == STACK_NAME:
        parts += _stack_sections(exp, final.scores)
    parts += ["## Plots", "", f"Diagnostics of the final model ({final.name}) on its OOF rows.", ""]
    parts += [f"![{p.removesuffix('.png')}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


# -- command line -----------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> None:
    write_report(args.experiment_dir)


def add_parser(subparsers: Any) -> None:
    """Add ``hybridstack report <experiment_dir>`` to the CLI."""
    parser = subparsers.add_parser("report", help="write report/report.md and plots for an experiment")
    parser.add_argument("experiment_dir", help="the experiment folder, e.g. runs/jigsaw")
    parser.set_defaults(func=_cmd_report)
