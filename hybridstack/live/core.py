"""What the page and the server share, free of streamlit and fastapi: loading the predictor,
building rows, formatting predictions, the leaderboard, highlighting n-grams, scoring a CSV.

Nothing here writes under the run folder or its workdir.
"""

from __future__ import annotations

import html
import importlib.util
import math
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hybridstack.errors import HybridstackError

if TYPE_CHECKING:
    from hybridstack.predict.predictor import Predictor
    from hybridstack.tasks import Task

# the modules each extra brings (pyproject.toml: [project.optional-dependencies])
EXTRAS = {"ui": ("streamlit",), "serve": ("fastapi", "uvicorn")}

DEFAULT_UPLOAD_CHUNK_ROWS = 1000  # the page's progress bar moves once per chunk

loads = 0  # predictors loaded in this process (the page must load once, not per interaction)


def require_extra(command: str, extra: str) -> None:
    """Refuse a command whose optional extra is not installed, in one line."""
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install or a module blocked in sys.modules
            found = False
        if not found:
            raise HybridstackError(f"hybridstack {command} needs the {extra} extra: "
                                   f"pip install 'hybridstack[{extra}]'")


def load_predictor(run_dir: str | Path, cache_dir: str | Path | None = None) -> Predictor:
    """``hybridstack.predict.load(run_dir, cache_dir)``: new embeddings go to ``cache_dir`` (None: a
    temporary folder that lives as long as the predictor), never under the run folder."""
    global loads
    from hybridstack.predict import load

    loads += 1
    return load(run_dir, cache_dir)


# On a CPU a transformer's cost grows with the padded length of its batch: one long text
# pads every short text of its batch to its length. sentence-transformers sorts a call's
# texts by length, so small encode batches hold texts of similar length.
SERVE_CPU_ENCODE_BATCH = 4


def tune_for_serving(predictor: Predictor, cpu_encode_batch: int | None = None,
                     progress: bool = False) -> Predictor:
    """Fit the predictor's embedding caches for many small calls; the predictions are the same.

    * No per-call progress bar (a server would print one per request into its log).
    * ``cpu_encode_batch`` (on a CPU only): texts per encoder batch, so that a micro-batch
      of mixed lengths is encoded with little padding while everything else (features,
      heads, kNN, stack) still runs once per micro-batch. The batch size is not part of the
      cache key, so the run's cached embeddings are still found.
    """
    import functools

    import torch

    from hybridstack.features.embeddings import EmbeddingCache

    for model in predictor.base_models:
        cache = getattr(getattr(model, "featurizer", None), "cache", None)
        if not isinstance(cache, EmbeddingCache):
            continue
        if not progress and not isinstance(cache.encode, functools.partial):
            cache.encode = functools.partial(cache.encode, show_progress=False)
        if cpu_encode_batch and not torch.cuda.is_available():
            cache.batch_size = min(cache.batch_size, cpu_encode_batch)
    return predictor


# -- rows ----------------------------------------------------------------------------------------


def text_row(task: Task, texts: Mapping[str, str] | str) -> dict[str, str]:
    """Multilabel/multiclass: one text (put in the first text column) or a text per column."""
    columns = task.text_columns()
    if isinstance(texts, str):
        texts = {columns[0]: texts}
    return {column: texts.get(column, "") or "" for column in columns}


def pair_row(task: Task, prompt: str, response_a: str, response_b: str) -> dict[str, list[str]]:
    """Pairwise: each text as a one-turn list (what the competition's JSON columns hold)."""
    return {column: [text] for column, text in zip(task.text_columns(),
                                                  (prompt, response_a, response_b))}


def thresholds_of(predictor: Predictor) -> dict[str, float] | None:
    """Multilabel: each label's stored decision threshold; else None (the argmax decides)."""
    if not predictor.multilabel:
        return None
    return {name: float(predictor.thresholds[name]["threshold"]) for name in predictor.label_names}


def prediction_records(predictor: Predictor, P: np.ndarray) -> list[dict[str, Any]]:
    """Per row: probabilities {label: p}, the labels given, and the thresholds (or None)."""
    names = predictor.label_names
    given = predictor.labels_from_proba(P)
    thresholds = thresholds_of(predictor)
    out = []
    for i in range(len(P)):
        labels = ([names[j] for j in np.flatnonzero(given[i])] if predictor.multilabel
                  else [str(given[i])])
        out.append({"probabilities": {name: float(P[i, j]) for j, name in enumerate(names)},
                    "labels": labels, "thresholds": thresholds})
    return out


def jsonable(value: Any) -> Any:
    """numpy scalars and arrays to Python numbers and lists (NaN/inf to None), recursively."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- leaderboard and report ----------------------------------------------------------------------


def leaderboard(run_dir: str | Path, labels: str | Path | None = None) -> list[dict[str, Any]]:
    """Every model's CV (``models/*/scores.json``, ``stack/scores.json``), best first.

    Each row: model, metric, cv (``overall``), rows_validated (the rows the CV covers) and,
    with ``labels`` (the competition's test labels), heldout and heldout_rows: the model's
    ``test.npy`` scored as ``hybridstack score`` scores a submission.
    """
    from hybridstack.runs import read_json

    run_dir = Path(run_dir)
    folders = sorted(p for p in (run_dir / "models").glob("*") if (p / "scores.json").is_file())
    if (run_dir / "stack" / "scores.json").is_file():
        folders.append(run_dir / "stack")
    heldout = heldout_scorer(run_dir, labels) if labels is not None else None
    rows = []
    for folder in folders:
        scores = read_json(folder / "scores.json")
        row = {"model": folder.name, "metric": scores["metric_name"], "cv": float(scores["overall"]),
               "rows_validated": scores.get("rows_validated"),
               "greater_is_better": bool(scores.get("greater_is_better", True))}
        if heldout is not None and (folder / "test.npy").is_file():
            result = heldout(np.load(folder / "test.npy"))
            row.update(heldout=result.value, heldout_rows=result.n_rows)
        rows.append(row)
    rows.sort(key=lambda r: -r["cv"] if r["greater_is_better"] else r["cv"])
    return rows


def heldout_scorer(run_dir: Path, labels: str | Path) -> Callable[[np.ndarray], Any]:
    """A function scoring one ``test.npy`` of the experiment against ``labels`` (a ScoreResult).

    The test rows' ids come from the experiment's test file; the predictions are written
    as a submission (id + one column per label) to a temporary file and scored by
    :func:`hybridstack.commands.score.score_submission` with the task's kind.
    """
    from hybridstack.commands.score import score_submission
    from hybridstack.predict.source import open_run
    from hybridstack.tables import read_table

    labels = Path(labels)
    if not labels.is_file():
        raise HybridstackError(f"--labels: file not found: {labels}")
    ctx = open_run(run_dir)  # reads the config snapshot only
    test_path = ctx.cfg.data.test
    if test_path is None or not Path(test_path).is_file():
        raise HybridstackError(f"--labels needs the experiment's test file for the row ids "
                               f"({test_path} is missing); restore it")
    table = read_table(test_path, ctx.cfg.data.delimiter, ctx.cfg.data.column_names)
    ids = ctx.task.parse(table, labelled=False).ids
    id_column, names, kind = ctx.task.cfg.id_column, ctx.task.label_names, ctx.task.kind

    def score(test_pred: np.ndarray):
        if len(test_pred) != len(ids):
            raise HybridstackError(f"a test.npy has {len(test_pred)} rows, the test file "
                                   f"{len(ids)}; re-run the experiment")
        sub = pd.DataFrame(test_pred, columns=names)
        sub.insert(0, id_column, ids)
        with tempfile.TemporaryDirectory(prefix="hybridstack-heldout-") as tmp:
            sub.to_csv(Path(tmp) / "submission.csv", index=False)
            return score_submission(Path(tmp) / "submission.csv", labels, kind=kind,
                                    id_column=id_column)

    return score


def report_plots(run_dir: str | Path) -> list[Path]:
    """The experiment's report plots (``report/*.png``, written by ``hybridstack report``)."""
    return sorted((Path(run_dir) / "report").glob("*.png"))


# -- explanations --------------------------------------------------------------------------------


def field_columns(task: Task, field: str) -> list[str]:
    """The input columns an explanation's ``field`` comes from (single text: every column)."""
    columns = task.text_columns()
    if field in columns:
        return [field]
    if task.kind != "pairwise" and field in task.field_names:
        return columns
    return []  # e.g. pairwise "response_a-response_b": a difference of two texts


def ngram_weights(task: Task, explained: dict[str, Any]) -> dict[str, dict[tuple[str, str], float]]:
    """Per input column: {(ngram, analyzer): largest contribution} over labels and models."""
    out: dict[str, dict[tuple[str, str], float]] = {}
    for per_label in explained["models"].values():
        for entries in per_label.values():
            for entry in entries:
                if "ngram" not in entry or entry["contribution"] <= 0:
                    continue
                for column in field_columns(task, entry["field"]):
                    key = (entry["ngram"], entry["analyzer"])
                    weights = out.setdefault(column, {})
                    weights[key] = max(weights.get(key, 0.0), float(entry["contribution"]))
    return out


def _ngram_pattern(ngram: str, analyzer: str) -> re.Pattern[str] | None:
    if analyzer == "word":
        tokens = ngram.split()
        if not tokens:
            return None
        # the word tokenizer drops 1-character words, so they may sit between the tokens
        between = r"\W+(?:\w\W+)*?"
        return re.compile(r"(?<!\w)" + between.join(map(re.escape, tokens)) + r"(?!\w)",
                          re.IGNORECASE)
    if len(ngram.strip()) < 3:  # short char n-grams match almost everywhere
        return None
    return re.compile(re.escape(ngram.strip()), re.IGNORECASE)


def highlight_html(text: str, weights: Mapping[tuple[str, str], float]) -> str:
    """``text`` as HTML with the n-grams that pushed the prediction marked, stronger = more."""
    strength = np.zeros(len(text))
    for (ngram, analyzer), weight in weights.items():
        pattern = _ngram_pattern(ngram, analyzer)
        if pattern is None:
            continue
        for match in pattern.finditer(text):
            span = strength[match.start():match.end()]
            np.maximum(span, weight, out=span)
    top = strength.max() if len(text) else 0.0
    parts, start = [], 0
    for end in range(1, len(text) + 1):
        if end == len(text) or strength[end] != strength[start]:
            piece = html.escape(text[start:end]).replace("\n", "<br>")
            if strength[start] > 0:
                alpha = 0.2 + 0.6 * strength[start] / top
                parts.append(f'<mark style="background: rgba(255, 120, 0, {alpha:.2f}); '
                             f'padding: 0 1px" title="+{strength[start]:.3f}">{piece}</mark>')
            else:
                parts.append(piece)
            start = end
    return "".join(parts)


def contribution_rows(explained: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Flat tables of an explanation: TF-IDF n-grams and tree-head feature contributions."""
    ngrams, features = [], []
    for model, per_label in explained["models"].items():
        for label, entries in per_label.items():
            for entry in entries:
                row = {"model": model, "label": label, **entry}
                (ngrams if "ngram" in entry else features).append(row)
    return ngrams, features


# -- a CSV upload --------------------------------------------------------------------------------


def score_upload(predictor: Predictor, data: bytes, name: str,
                 chunk_rows: int = DEFAULT_UPLOAD_CHUNK_ROWS,
                 progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Score an uploaded CSV/TSV chunk by chunk: the columns of ``predict --input --output``.

    The file is parsed exactly as ``hybridstack predict --input`` parses one (the same
    reader, delimiter guess and row numbering); ``progress(done, total)`` after each chunk.
    """
    from hybridstack.predict.batch import read_chunks

    safe_name = Path(name).name or "upload.csv"
    with tempfile.TemporaryDirectory(prefix="hybridstack-upload-") as tmp:
        path = Path(tmp) / safe_name
        path.write_bytes(data)
        chunks = list(read_chunks(path, chunk_rows))
    total = sum(len(chunk) for chunk in chunks)
    if total == 0:
        raise HybridstackError(f"{safe_name} has a header but no rows")
    frames, done = [], 0
    for chunk in chunks:
        ds = predictor.parse(chunk, source=safe_name, first_row=done)
        frames.append(predictor.predict_frame(ds))
        done += len(ds)
        if progress is not None:
            progress(done, total)
    return pd.concat(frames, ignore_index=True)
