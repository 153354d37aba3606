"""The experiment directory: fixed paths, atomic writes and DONE markers.

Layout (docs/ARCHITECTURE.md)::

    runs/<experiment>/
      config.toml  dataset.json  folds.npy  submission.csv
      models/<name>/ config.json oof.npy test.npy scores.json DONE fold_<k>/
      stack/        the same files for the ensemble
      report/
    cache/features/                  feature matrices (e.g. TF-IDF), keyed by data fingerprint
                                     and settings, shared by experiments on the same data

Every file is written to a temporary name in the same folder and renamed into place,
so a killed process never leaves a half file under a name a later stage reads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import joblib
import numpy as np

from hybridstack.errors import HybridstackError

OOF_FILE = "oof.npy"
TEST_FILE = "test.npy"
SCORES_FILE = "scores.json"
CONFIG_FILE = "config.json"
DONE_FILE = "DONE"
# models/<name>/: what turns parsed rows into the fold models' features (e.g. the fitted
# TF-IDF vectorizer); a model folder that has one needs no stage code to predict
FEATURIZER_FILE = "featurizer.joblib"
FOLD_MODEL_FILE = "model.joblib"  # fold_<k>/: the fitted head
# stack/: the blend's weights (readable), the fitted stacker, multilabel decision thresholds
WEIGHTS_FILE = "weights.json"
META_MODEL_FILE = "meta_model.joblib"
THRESHOLDS_FILE = "thresholds.json"


# -- atomic writes -------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise _disk_error(path, err) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise _disk_error(path, err) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _disk_error(path: Path, err: OSError) -> HybridstackError:
    if err.errno == errno.ENOSPC:
        return HybridstackError(f"disk full while writing {path}: free space or set workdir elsewhere")
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return HybridstackError(
            f"cannot write {path}: the folder is read-only; set workdir to a writable folder"
        )
    return HybridstackError(f"cannot write {path}: {err.strerror}")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def write_joblib(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        joblib.dump(obj, tmp)


def write_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Atomically write ``path`` with ``writer(binary_file_handle)``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)


def copy_file(src: str | Path, dst: str | Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- the experiment directory ----------------------------------------------------------


@dataclass(frozen=True)
class ModelDir:
    """One base model's (or the stacker's) folder of fixed file names."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    oof_path = property(lambda self: self.path / OOF_FILE)
    test_path = property(lambda self: self.path / TEST_FILE)
    scores_path = property(lambda self: self.path / SCORES_FILE)
    config_path = property(lambda self: self.path / CONFIG_FILE)
    done_path = property(lambda self: self.path / DONE_FILE)

    def fold_dir(self, fold: int) -> Path:
        return self.path / f"fold_{fold}"

    def is_done(self, config_hash: str | None = None) -> bool:
        """True when DONE exists (and, if given, was written for ``config_hash``)."""
        if not self.done_path.is_file():
            return False
        if config_hash is None:
            return True
        return self.done_path.read_text().strip() == config_hash

    def mark_done(self, config_hash: str) -> None:
        write_text(self.done_path, config_hash + "\n")

    def clear_done(self) -> None:
        self.done_path.unlink(missing_ok=True)

    def load_oof(self) -> np.ndarray:
        return np.load(self.oof_path)

    def load_test(self) -> np.ndarray | None:
        return np.load(self.test_path) if self.test_path.is_file() else None

    def load_scores(self) -> dict[str, Any]:
        return read_json(self.scores_path)


@dataclass(frozen=True)
class ExperimentDir:
    """Paths inside ``runs/<experiment>/``; only stages and the CLI write here."""

    path: Path

    config_path = property(lambda self: self.path / "config.toml")
    dataset_path = property(lambda self: self.path / "dataset.json")
    folds_path = property(lambda self: self.path / "folds.npy")
    submission_path = property(lambda self: self.path / "submission.csv")
    # Feature matrices are keyed by the data fingerprint and their settings, so they live in
    # the workdir's shared cache (<workdir>/cache/features): sweeps over head settings and
    # sibling experiments on the same data reuse them instead of recomputing.
    features_dir = property(lambda self: self.path.parent.parent / "cache" / "features")
    models_dir = property(lambda self: self.path / "models")
    report_dir = property(lambda self: self.path / "report")

    def model(self, name: str) -> ModelDir:
        """``name`` of this experiment, or ``<experiment>/<name>`` of a sibling in the same workdir."""
        if "/" in name:
            experiment, model_name = name.split("/", 1)
            return ExperimentDir(self.path.parent / experiment).model(model_name)
        return ModelDir(self.models_dir / name)

    @property
    def stack(self) -> ModelDir:
        return ModelDir(self.path / "stack")

    def finished_models(self) -> list[ModelDir]:
        """Base models whose DONE marker exists, sorted by name."""
        if not self.models_dir.is_dir():
            return []
        return [ModelDir(p) for p in sorted(self.models_dir.iterdir()) if (p / DONE_FILE).is_file()]
