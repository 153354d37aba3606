"""Opening an experiment: load and validate the data, write the snapshot and folds once.

Every stage starts with :func:`open_experiment`. It refuses to reuse an experiment
folder whose data, task or CV settings changed (stale folds would silently leak),
and validates test ids against the sample submission before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from hybridstack.config import Config, config_from_dict
from hybridstack.errors import HybridstackError
from hybridstack.folds import fold_rows, make_folds
from hybridstack.runs import (
    ExperimentDir,
    read_json,
    write_joblib,
    write_json,
    write_npy,
    write_text,
)
from hybridstack.tables import file_sha256, read_table
from hybridstack.tasks import Dataset, Task, make_task

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    cfg: Config
    dir: ExperimentDir
    task: Task
    train: Dataset
    test: Dataset | None
    sample: pd.DataFrame | None
    folds: np.ndarray  # (n_train,) int8 fold id
    fingerprint: str  # hash of the input files and the settings that shape train rows
    _stopping_rows: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_splits(self) -> int:
        return int(self.folds.max()) + 1

    def stage_hash(self, *sections: str) -> str:
        """What a stage's DONE marker records: the data fingerprint + its config sections."""
        blob = self.fingerprint + self.cfg.section_hash(*sections)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def stopping_rows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(fit_rows, stop_rows): fold ``k``'s training rows split for early stopping.

        ``stop_rows`` are about ``cv.inner_fraction`` of them, grouped (pairwise: by prompt)
        and stratified as the folds are, the same for every model of the experiment.
        """
        if k not in self._stopping_rows:
            train_rows, _ = fold_rows(self.folds, k)
            n_parts = max(2, round(1 / self.cfg.cv.inner_fraction))
            groups = None if self.train.groups is None else self.train.groups[train_rows]
            part = make_folds(self.task.stratify_target(self.train.Y[train_rows]), n_parts,
                              self.cfg.cv.seed + k, groups)
            self._stopping_rows[k] = (train_rows[part != 0], train_rows[part == 0])
        return self._stopping_rows[k]

    def early_stopping_split(self):
        """``stopping_rows`` under ``cv.early_stopping = "inner"``; None on the held-out fold."""
        return self.stopping_rows if self.cfg.cv.early_stopping == "inner" else None

    def settings_hash(self, settings: dict) -> str:
        """What one model's DONE marker records: the data fingerprint + that model's own
        settings (so adding or changing one model never refits another)."""
        blob = self.fingerprint + json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def snapshot_config(self) -> None:
        """Write config.toml: called when a stage saves outputs, so the snapshot is always the
        config that produced the latest model (a stage that fails later leaves it untouched)."""
        write_text(self.dir.config_path, self.cfg.to_toml())


@dataclass
class LoadedData:
    """The inputs of an experiment, read, parsed and checked (nothing written yet)."""

    task: Task
    train: Dataset
    test: Dataset | None
    sample: pd.DataFrame | None
    record: dict  # what dataset.json holds, the fingerprint included


def load_data(cfg: Config) -> LoadedData:
    """Read and parse the train, test and sample files once; hash them for the fingerprint."""
    task = make_task(cfg)
    train = task.parse(_read(cfg, cfg.data.train), labelled=True)
    if cfg.data.clean.dedup:
        train = deduplicate(task, train)
    test = task.parse(_read(cfg, cfg.data.test), labelled=False) if cfg.data.test else None
    sample = read_sample(cfg, task, test)
    return LoadedData(task, train, test, sample, dataset_record(cfg, task, train, test))


def open_experiment(cfg: Config) -> Experiment:
    """Open (or create) ``runs/<experiment>/`` for training: the one place that writes
    dataset.json and folds.npy. The pipeline calls it once per process."""
    data = load_data(cfg)
    task, train, test, sample, dataset = data.task, data.train, data.test, data.sample, data.record
    exp_dir = ExperimentDir(cfg.run_dir)
    _check_same_dataset(exp_dir, dataset)
    write_json(exp_dir.dataset_path, dataset)
    folds = _load_or_make_folds(exp_dir, cfg, task, train)
    exp = Experiment(cfg, exp_dir, task, train, test, sample, folds, dataset["fingerprint"])
    if not exp_dir.config_path.is_file():
        exp.snapshot_config()  # a new folder describes itself from the start
    if test is None:
        log.info("no test file: running cross-validation only (no submission.csv)")
    return exp


def _read(cfg: Config, path):
    return read_table(path, cfg.data.delimiter, cfg.data.column_names)


def snapshot_config_of(run_dir: str | Path, check_files: bool = True) -> Config:
    """The config a run folder was made with (its config.toml), ``workdir`` and ``experiment``
    pinned to where the folder is now, so a moved or attached run folder finds itself."""
    exp_dir = ExperimentDir(Path(run_dir).resolve())
    if not exp_dir.config_path.is_file():
        raise HybridstackError(
            f"{run_dir} is not an experiment folder (no config.toml); give runs/<experiment>")
    raw = tomllib.loads(exp_dir.config_path.read_text(encoding="utf-8"))
    raw["workdir"] = str(exp_dir.path.parent.parent)
    raw["experiment"] = exp_dir.path.name
    return config_from_dict(raw, base_dir=exp_dir.path, source=str(exp_dir.config_path),
                            check_files=check_files)


def reopen_experiment(run_dir: str | Path) -> Experiment:
    """A finished experiment, read-only (report, audit, compare): nothing is written.

    The data are re-read through its config snapshot and the fingerprint recomputed from
    them as they are now (audit compares it with dataset.json).
    """
    exp_dir = ExperimentDir(Path(run_dir).resolve())
    if not exp_dir.folds_path.is_file():
        raise HybridstackError(f"{run_dir} has no folds.npy; run a stage first")
    cfg = snapshot_config_of(exp_dir.path)
    data = load_data(cfg)
    folds = np.load(exp_dir.folds_path, allow_pickle=False)
    return Experiment(cfg, exp_dir, data.task, data.train, data.test, data.sample, folds,
                      data.record["fingerprint"])


def save_snapshot(exp: Experiment, path: Path) -> None:
    """The opened experiment for worker processes (the data-parallel fine-tune): they load it
    instead of re-reading and re-parsing the input files."""
    write_joblib(path, exp)


def load_snapshot(path: Path) -> Experiment:
    return joblib.load(path)


def read_sample(cfg: Config, task: Task, test: Dataset | None) -> pd.DataFrame | None:
    if cfg.data.sample_submission is None:
        return None
    sample = read_table(cfg.data.sample_submission).frame
    id_col = cfg.task.id_column
    if id_col not in sample.columns:
        raise HybridstackError(
            f"sample submission {cfg.data.sample_submission.name} has no id column '{id_col}'"
        )
    if test is not None:
        sample_ids = set(sample[id_col].astype(str))
        test_ids = set(test.ids)
        if sample_ids != test_ids:
            raise HybridstackError(
                f"test ids differ from the sample submission's: {len(test_ids - sample_ids)} test ids "
                f"not in it, {len(sample_ids - test_ids)} sample ids not in test; "
                "use the matching test.csv and sample_submission.csv"
            )
        # the columns are checked now, not after training when the submission is written
        uniform = np.full((len(test), task.n_classes), 1 / task.n_classes, dtype=np.float32)
        task.submission_frame(test.ids, uniform, sample)
    return sample


def deduplicate(task: Task, train: Dataset) -> Dataset:
    """Drop exact duplicate train rows after cleaning; report rows with conflicting labels."""
    texts = task.joined_text(train)
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        by_text[t].append(i)
    keep = np.array(sorted(rows[0] for rows in by_text.values()))
    conflicts = sum(
        1 for rows in by_text.values()
        if len(rows) > 1 and not (train.Y[rows] == train.Y[rows[0]]).all()
    )
    n_dropped = len(train) - len(keep)
    log.info("de-duplication: %d of %d train rows dropped as exact duplicates", n_dropped, len(train))
    if conflicts:
        log.warning("de-duplication: %d duplicated texts carry conflicting labels (first kept)",
                    conflicts)
    deduped = train.subset(keep)
    deduped.stats.update(dedup_dropped=n_dropped, dedup_conflicts=conflicts)
    return deduped


def dataset_record(cfg: Config, task: Task, train: Dataset, test: Dataset | None) -> dict:
    files = {
        key: {"path": str(path), "sha256": file_sha256(path)}
        for key in ("train", "test", "sample_submission")
        if (path := getattr(cfg.data, key)) is not None
    }
    # Everything that shapes the train rows, their target or their folds.
    shape = {
        "files": {k: v["sha256"] for k, v in files.items()},
        # positive_label only names a submission column: it shapes no row, target or fold
        "task": cfg.task.model_dump(mode="json", exclude={"positive_label"}),
        "read": {"delimiter": cfg.data.delimiter, "column_names": cfg.data.column_names},
        "clean": cfg.data.clean.model_dump(mode="json"),
        # the settings that make the folds (early stopping is a model setting)
        "cv": cfg.cv.model_dump(mode="json", include={"n_splits", "seed"}),
    }
    fingerprint = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "fingerprint": fingerprint,
        "files": files,
        "task_kind": task.kind,
        "label_names": task.label_names,
        "n_train": len(train),
        "n_test": 0 if test is None else len(test),
        "train_stats": train.stats,
        "test_stats": None if test is None else test.stats,
        "shape": shape,
    }


def _check_same_dataset(exp_dir: ExperimentDir, dataset: dict) -> None:
    if not exp_dir.dataset_path.is_file():
        return
    old = read_json(exp_dir.dataset_path)
    if old.get("fingerprint") == dataset["fingerprint"]:
        return
    changed = [k for k in dataset["shape"] if old.get("shape", {}).get(k) != dataset["shape"][k]]
    raise HybridstackError(
        f"{exp_dir.path} was made from different inputs (changed: {', '.join(changed) or 'unknown'}); "
        "its folds and models would be stale: use a new experiment name or delete that folder"
    )


def _load_or_make_folds(exp_dir: ExperimentDir, cfg: Config, task: Task, train: Dataset) -> np.ndarray:
    if exp_dir.folds_path.is_file():
        folds = np.load(exp_dir.folds_path)
        if len(folds) == len(train):
            return folds
        raise HybridstackError(
            f"{exp_dir.folds_path} has {len(folds)} rows but train has {len(train)}; "
            "delete the experiment folder to start over"
        )
    folds = make_folds(task.stratify_target(train.Y), cfg.cv.n_splits, cfg.cv.seed, train.groups)
    write_npy(exp_dir.folds_path, folds)
    return folds
