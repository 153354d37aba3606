"""Reopening a finished experiment for prediction, and turning new rows into a Dataset.

Nothing here writes into the experiment folder: predicting is read-only.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hybridstack.config import Config
from hybridstack.errors import HybridstackError
from hybridstack.experiment import deduplicate, snapshot_config_of
from hybridstack.runs import ExperimentDir, read_json
from hybridstack.tables import Table, file_sha256, read_table, require_columns
from hybridstack.tasks import Dataset, Task, make_task
from hybridstack.text import replace_lone_surrogates

Rows = pd.DataFrame | Mapping[str, Any] | Iterable[Mapping[str, Any]]


# `hybridstack predict`: new texts' embeddings, in the current folder (kept between calls)
DEFAULT_CACHE_DIR = Path("hybridstack-cache")


@dataclass
class RunContext:
    """What every model predictor needs from the experiment: its folder, config and task.

    Nothing is written under ``dir`` or its workdir; embeddings of texts the training run
    did not cache go to ``cache_dir``.
    """

    dir: ExperimentDir
    cfg: Config
    task: Task
    dataset: dict[str, Any]  # dataset.json: fingerprints, row counts, label names
    cache_dir: Path
    # keeps a temporary cache_dir alive as long as the context (removed with it)
    _scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def rerun_hint(self) -> str:
        """The config that reproduces this run folder (its snapshot works as a config file)."""
        return str(self.dir.config_path)

    @cached_property
    def train(self) -> Dataset:
        """The experiment's train rows, parsed and de-duplicated exactly as at training time.

        Only runs made before the embed stage saved ``knn_groups.npz`` need it: there the
        kNN exclusion groups of new rows are numbered after the train rows' groups, so a
        new row that repeats a train text (or, pairwise, a train prompt) gets that row's
        group and never sees it as a neighbour, as the test rows did.
        """
        cfg, recorded = self.cfg, self.dataset["files"]["train"]
        if not cfg.data.train.is_file():
            raise HybridstackError(
                f"{self.dir.path.name} was trained before kNN groups were saved with the model, "
                f"so predicting needs its train file {cfg.data.train}; restore it, or re-run "
                f"`hybridstack run embed -c {self.rerun_hint}` and the stack")
        if file_sha256(cfg.data.train) != recorded["sha256"]:
            raise HybridstackError(
                f"data.train {cfg.data.train} changed since {self.dir.path.name} was trained; "
                "restore the original file (the kNN features depend on it)")
        table = read_table(cfg.data.train, cfg.data.delimiter, cfg.data.column_names)
        train = self.task.parse(table, labelled=True)
        return deduplicate(self.task, train) if cfg.data.clean.dedup else train


def open_run(run_dir: str | Path, cache_dir: str | Path | None = None) -> RunContext:
    """The config snapshot, dataset record and task of ``runs/<experiment>/``, read-only.

    ``workdir`` and ``experiment`` are pinned to where the folder is now (a moved or
    attached run folder still finds its shared embedding cache next to it). The data
    files (train included) are not needed to score new rows, so they may be gone.
    ``cache_dir`` receives embeddings of new texts; None: a temporary folder that lives as
    long as the returned context (the CLI passes ``./hybridstack-cache``).
    """
    exp_dir = ExperimentDir(Path(run_dir).resolve())
    if not exp_dir.config_path.is_file() or not exp_dir.dataset_path.is_file():
        raise HybridstackError(
            f"{run_dir} is not an experiment folder (no config.toml/dataset.json); "
            "give runs/<experiment>")
    cfg = snapshot_config_of(exp_dir.path, check_files=False)
    dataset = read_json(exp_dir.dataset_path)
    task = make_task(cfg, classes=dataset["label_names"])
    if task.label_names != dataset["label_names"]:
        raise HybridstackError(
            f"{exp_dir.config_path}: label columns {task.label_names} differ from the trained "
            f"{dataset['label_names']}; restore the [task] section")
    if cache_dir is not None:
        return RunContext(exp_dir, cfg, task, dataset, Path(cache_dir).resolve())
    scratch = tempfile.TemporaryDirectory(prefix="hybridstack-embeddings-")
    return RunContext(exp_dir, cfg, task, dataset, Path(scratch.name), scratch)


def _cell(value: Any) -> str:
    """One input cell as the text a CSV would hold: None/NaN -> "", a list of turns -> JSON.

    Lone surrogates become U+FFFD here already: pandas' Arrow-backed strings (pandas 3 with
    pyarrow installed) cannot hold them. In a list of turns JSON escapes them instead, and
    parsing counts them as it does for a CSV.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return replace_lone_surrogates(str(value))[0]


def rows_frame(rows: Rows) -> pd.DataFrame:
    """A DataFrame of str cells from a DataFrame, one dict, or an iterable of dicts."""
    if isinstance(rows, pd.DataFrame):
        frame = rows.reset_index(drop=True).map(_cell)
    else:
        # cells are made text before pandas sees them (see _cell)
        records = [rows] if isinstance(rows, Mapping) else list(rows)
        frame = pd.DataFrame([{k: _cell(v) for k, v in row.items()} for row in records])
    if frame.empty:
        raise HybridstackError("no rows to predict: give at least one row")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def parse_rows(task: Task, rows: Rows, source: str = "rows", first_row: int = 0) -> Dataset:
    """Validate new rows in the task's own column format and parse them (unlabelled).

    Parameters
    ----------
    task : the experiment's task. rows : DataFrame, dict or dicts with the text columns.
    source : name used in error messages (e.g. the input file's name).
    first_row : row number of the first row; without an id column the row numbers are the ids.

    Returns
    -------
    Dataset with ``ids`` (n,) and the cleaned text ``fields``; ``Y`` is None.
    """
    frame = rows_frame(rows)
    table = Table(frame, Path(source), n_bad_bytes=0)
    require_columns(table, task.text_columns(),
                    hint="give every text column the experiment was trained on")
    id_column = task.cfg.id_column
    if id_column not in frame.columns:
        frame[id_column] = np.arange(first_row, first_row + len(frame)).astype(str)
    return task.parse(table, labelled=False)
