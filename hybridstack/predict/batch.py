"""Scoring a file with a finished experiment: the rich output and/or the competition
submission, chunk by chunk, on one process or split over N (one GPU each).

Both files are written to temporary names and renamed into place only when every row
was scored and the submission validated against the sample: a failure leaves nothing
half written. Nothing is written under the run folder or its workdir.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hybridstack.errors import HybridstackError
from hybridstack.progress import progress
from hybridstack.runs import atomic_path, write_text
from hybridstack.tables import iter_table, read_table
from hybridstack.tasks import Task

if TYPE_CHECKING:
    from hybridstack.predict.predictor import Predictor

DEFAULT_CHUNK_ROWS = 10_000  # ~10k rows of features and embeddings stay well under 1 GB


@dataclass
class BatchResult:
    rows: int = 0
    empty_text: int = 0  # rows whose text was empty (kept as empty text, as in training)
    ids: list[np.ndarray] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)


def read_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Chunks of ``chunk_rows`` rows, read as ``tables.iter_table`` reads every table."""
    try:
        yield from iter_table(path, chunk_rows=chunk_rows, hint="check the file")
    except HybridstackError as err:
        raise HybridstackError(f"--input: {err}") from None


def read_sample(path: Path, task: Task) -> pd.DataFrame:
    """The sample submission (plain or zipped), with its id column."""
    sample = read_table(path).frame
    if task.cfg.id_column not in sample.columns:
        raise HybridstackError(f"sample submission {path.name} has no id column "
                               f"'{task.cfg.id_column}'; pass the competition's sample with --sample")
    return sample


def input_ids(task: Task, path: Path, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """The ids of an input file (its row numbers when it has no id column), read cheaply."""
    id_col, parts, n_rows = task.cfg.id_column, [], 0
    for chunk in read_chunks(path, chunk_rows):
        parts.append(chunk[id_col].astype(str).to_numpy() if id_col in chunk.columns
                     else np.arange(n_rows, n_rows + len(chunk)).astype(str))
        n_rows += len(chunk)
    return np.concatenate(parts) if parts else np.array([], dtype=str)


def check_ids_match(task: Task, ids: np.ndarray, sample: pd.DataFrame) -> pd.Series:
    """Refuse input ids that are not the sample's (as a set, each once); the sample's ids."""
    sample_ids = sample[task.cfg.id_column].astype(str)
    missing = set(sample_ids) - set(ids)
    extra = set(ids) - set(sample_ids)
    if missing or extra or len(ids) != len(sample_ids) or len(set(ids)) != len(ids):
        example = next(iter(extra or missing), None)
        raise HybridstackError(
            f"input ids do not match the sample submission: {len(extra)} not in the sample, "
            f"{len(missing)} sample ids not in the input, {len(ids)} input rows for "
            f"{len(sample_ids)} sample rows (e.g. id {example!r}); pass the matching --sample")
    return sample_ids


def submission_in_input_order(task: Task, ids: np.ndarray, P: np.ndarray,
                              sample: pd.DataFrame) -> pd.DataFrame:
    """Exactly the sample's columns, one row per input row in the input's order.

    The input's ids must be the sample's ids (as a set, each once): a hidden test and its
    sample submission always are.
    """
    sample_ids = check_ids_match(task, ids, sample)
    ordered = sample.set_axis(sample_ids.to_numpy()).loc[ids].reset_index(drop=True)
    sub = task.submission_frame(ids, P, ordered)
    task.validate_submission(sub, ordered, ids)
    return sub


def predict_file(predictor: Predictor, input_path: Path, output_path: Path | None = None,
                 submission_path: Path | None = None, sample: pd.DataFrame | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> BatchResult:
    """Score every row of ``input_path`` chunk by chunk.

    ``output_path``: id, probabilities and ``pred_*`` labels. ``submission_path``: exactly
    the ``sample``'s columns in the input's id order.
    """
    if submission_path is not None and sample is None:
        raise ValueError("a submission needs the sample submission")
    result = BatchResult()
    with contextlib.ExitStack() as stack:
        out = None
        if output_path is not None:
            tmp = stack.enter_context(atomic_path(output_path))
            out = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        bar = stack.enter_context(progress(desc="predict", unit="rows"))
        for chunk in read_chunks(input_path, chunk_rows):
            ds = predictor.parse(chunk, source=input_path.name, first_row=result.rows)
            frame = predictor.predict_frame(ds)
            if out is not None:
                frame.to_csv(out, header=result.rows == 0, index=False)
            result.ids.append(ds.ids)
            result.probabilities.append(frame[predictor.label_names].to_numpy(np.float32))
            result.rows += len(ds)
            result.empty_text += ds.stats["empty_text"]
            bar.update(len(ds))
        if result.rows == 0:
            raise HybridstackError(f"--input: {input_path} has a header but no rows")
        submission = None
        if submission_path is not None:  # validated before either file is renamed into place
            submission = submission_in_input_order(
                predictor.task, np.concatenate(result.ids), np.concatenate(result.probabilities),
                sample)
    if submission is not None:
        write_text(submission_path, submission.to_csv(index=False))
    return result


# -- several processes -----------------------------------------------------------------------


def predict_file_in_processes(run_dir: Path, input_path: Path, output_path: Path | None,
                              submission_path: Path | None, sample: pd.DataFrame | None,
                              task: Task, cache_dir: Path, num_processes: int, cpu: bool,
                              chunk_rows: int) -> BatchResult:
    """Split the input's rows into ``num_processes`` contiguous parts, score each part in
    its own ``hybridstack predict`` process (one GPU each, or CPU with ``cpu``), and merge
    the parts in input order. Rows are scored independently, so the result is the
    one-process result (up to the batch composition of the GPU kernels)."""
    from hybridstack.finetune.launch import check_devices  # torch: only when needed

    check_devices(num_processes, cpu)
    frame = read_table(input_path).frame
    id_col = task.cfg.id_column
    if id_col not in frame.columns:  # row numbers over the whole file, as one process gives
        frame.insert(0, id_col, np.arange(len(frame)).astype(str))
    parts = [rows for rows in np.array_split(np.arange(len(frame)), num_processes) if len(rows)]
    with tempfile.TemporaryDirectory(prefix="hybridstack-predict-") as tmp:
        procs = []
        for k, rows in enumerate(parts):
            part_in, part_out = Path(tmp) / f"in_{k}.csv", Path(tmp) / f"out_{k}.csv"
            frame.iloc[rows].to_csv(part_in, index=False)
            command = [sys.executable, "-m", "hybridstack", "predict", str(run_dir),
                       "--input", str(part_in), "--output", str(part_out),
                       "--cache-dir", str(cache_dir), "--chunk-rows", str(chunk_rows)]
            procs.append((subprocess.Popen(command, env=_device_env(k, num_processes, cpu)),
                          part_out))
        codes = [proc.wait() for proc, _ in procs]
        if any(codes):
            raise HybridstackError(
                f"predict with {num_processes} processes: part(s) {[k for k, c in enumerate(codes) if c]} "
                "failed (see the messages above); nothing was written")
        merged = pd.concat([pd.read_csv(out, dtype={id_col: str}, keep_default_na=False)
                            for _, out in procs], ignore_index=True)
    labels = task.label_names
    result = BatchResult(rows=len(merged), ids=[merged[id_col].to_numpy(dtype=str)],
                         probabilities=[merged[labels].to_numpy(np.float32)])
    submission = None
    if submission_path is not None:
        submission = submission_in_input_order(task, result.ids[0], result.probabilities[0], sample)
    if output_path is not None:
        write_text(output_path, merged.to_csv(index=False))
    if submission is not None:
        write_text(submission_path, submission.to_csv(index=False))
    return result


def _device_env(k: int, num_processes: int, cpu: bool) -> dict[str, str]:
    """Process ``k``'s environment: the k-th visible GPU, or a share of the CPU cores."""
    from hybridstack.finetune.launch import worker_env
    env = worker_env(num_processes, cpu)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[k] if visible else str(k)
    return env
