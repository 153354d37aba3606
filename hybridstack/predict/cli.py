"""``hybridstack predict``: score one text, one pair, or a CSV with a finished experiment.

A batch is read in chunks (bounded memory on 10^5+ rows) and written to a temporary file
that replaces ``--output`` only when every chunk succeeded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm.auto import tqdm

from hybridstack.errors import HybridstackError, one_line
from hybridstack.predict.source import open_run
from hybridstack.runs import atomic_path
from hybridstack.tables import guess_delimiter, open_text, read_first_line
from hybridstack.tasks import Task

if TYPE_CHECKING:
    from hybridstack.predict.predictor import Predictor

DEFAULT_CHUNK_ROWS = 10_000  # ~10k rows of features and embeddings stay well under 1 GB


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict", help="score new texts with a finished experiment (and explain why)")
    parser.add_argument("experiment_dir", help="runs/<experiment> with a finished stack")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one text to classify (multilabel and multiclass tasks)")
    source.add_argument("--pair", nargs=3, metavar=("PROMPT", "A", "B"),
                        help="pairwise tasks: three text files, the prompt and the two "
                             "responses (each file's text is one turn)")
    source.add_argument("--input", help="CSV/TSV of rows in the task's column format (batch)")
    parser.add_argument("--output", help="with --input: CSV of id, probabilities and labels")
    parser.add_argument("--explain", action="store_true",
                        help="with --text/--pair: n-grams, feature contributions, stack shares")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help=f"with --input: rows per chunk (default {DEFAULT_CHUNK_ROWS})")
    parser.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> None:
    from hybridstack.predict.predictor import load  # torch & co. only when predicting

    check_arguments(args)
    if args.input:
        predictor = load(args.experiment_dir)
        output = Path(args.output)
        counts = predict_file(predictor, Path(args.input), output, args.chunk_rows)
        print(f"predicted {counts['rows']} rows -> {output} "
              f"({counts['empty_text']} with empty text, kept as empty text)")
        return
    task = open_run(args.experiment_dir).task  # cheap: wrong-mode errors come before loading
    row = text_row(task, args.text) if args.text is not None else pair_row(task, args.pair)
    predictor = load(args.experiment_dir)
    if args.explain:
        print(format_explanation(predictor, predictor.explain(row)[0]))
    else:
        frame = predictor.predict_frame(row)
        probabilities = dict(zip(predictor.label_names, frame[predictor.label_names].iloc[0]))
        print(format_prediction(predictor, probabilities))


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work, before any model is loaded."""
    if args.input and not args.output:
        raise HybridstackError("--input needs --output: the CSV to write predictions to")
    if args.output and not args.input:
        raise HybridstackError("--output goes with --input; --text/--pair print their result")
    if args.input and not Path(args.input).is_file():
        raise HybridstackError(f"--input: file not found: {args.input}")
    if args.input and args.explain:
        raise HybridstackError("--explain works with --text or --pair (one row), not --input")
    if args.chunk_rows < 1:
        raise HybridstackError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")


# -- one row -----------------------------------------------------------------------------------


def text_row(task: Task, text: str) -> dict[str, str]:
    """The row of one ``--text``: the text in the first text column, the others empty."""
    if task.kind == "pairwise":
        raise HybridstackError(
            "this is a pairwise experiment: give --pair PROMPT A B (three text files)")
    if not text.strip():
        raise HybridstackError("--text is empty: give the text to classify")
    columns = task.text_columns()
    return {column: text if i == 0 else "" for i, column in enumerate(columns)}


def pair_row(task: Task, paths: list[str]) -> dict[str, str]:
    """The row of ``--pair PROMPT A B``: each file's text as a one-turn JSON list."""
    if task.kind != "pairwise":
        raise HybridstackError(f"--pair is for pairwise experiments; this one is {task.kind}: "
                               "use --text")
    texts = []
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise HybridstackError(f"--pair: cannot read {path}: {err.strerror}") from None
        if not text.strip():
            raise HybridstackError(f"--pair: {path} is empty: each file needs the text of one turn")
        texts.append(text)
    return {column: json.dumps([text]) for column, text in zip(task.text_columns(), texts)}


def format_prediction(predictor: Predictor, probabilities: dict[str, float]) -> str:
    """One line per label (probability, threshold for multilabel, a mark on labels given)."""
    names = predictor.label_names
    width = max(map(len, names))
    if predictor.multilabel:
        cut = {n: predictor.thresholds[n]["threshold"] for n in names}
        given = [n for n in names if probabilities[n] >= cut[n]]
        lines = [f"{n:<{width}}  {probabilities[n]:.4f}  (threshold {cut[n]:.3f})"
                 f"{'  <- label' if n in given else ''}" for n in names]
    else:
        given = [max(names, key=lambda n: probabilities[n])]
        lines = [f"{n:<{width}}  {probabilities[n]:.4f}{'  <- label' if n in given else ''}"
                 for n in names]
    lines.append(f"labels: {', '.join(given) if given else 'none'}")
    return "\n".join(lines)


def format_explanation(predictor: Predictor, explained: dict[str, Any]) -> str:
    """The prediction, then the stack shares and each model's reasons per predicted label."""
    lines = [format_prediction(predictor, explained["probabilities"]), "why:"]
    stack = explained["stack"]
    shares = ", ".join(f"{name} {share:.2f}" for name, share in stack["shares"].items())
    lines.append(f"  stack {stack['method']} ({stack['kind']}): {shares}")
    for label in explained["labels"]:
        lines.append(f"  {label}:")
        for model, per_label in explained["models"].items():
            entries = per_label.get(label, [])
            lines.append(f"    {model}: {', '.join(map(_format_entry, entries)) or '-'}")
    return "\n".join(lines)


def _format_entry(entry: dict[str, Any]) -> str:
    if "ngram" in entry:
        where = "" if entry["field"] == "text" else f"{entry['field']}:"
        kind = "" if entry["analyzer"] == "word" else f" ({entry['analyzer']})"
        return f"{where}{entry['ngram']!r}{kind} {entry['contribution']:+.2f}"
    return f"{entry['feature']} {entry['contribution']:+.2f}"


# -- batches -----------------------------------------------------------------------------------


def read_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Chunks of ``chunk_rows`` rows, every cell a str (missing cells ""), like read_table."""
    try:
        first_line = read_first_line(path)
    except OSError as err:
        raise HybridstackError(f"--input: cannot read {path}: {err.strerror}") from None
    try:
        with open_text(path) as fh, pd.read_csv(fh, sep=guess_delimiter(path, first_line),
                                                dtype=str, keep_default_na=False,
                                                chunksize=chunk_rows) as reader:
            yield from reader
    except pd.errors.EmptyDataError:
        raise HybridstackError(f"--input: {path} is empty: it needs a header line and rows") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise HybridstackError(f"--input: cannot parse {path} ({one_line(err)})") from None


def predict_file(predictor: Predictor, input_path: Path, output_path: Path,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict[str, int]:
    """Predict every row of ``input_path`` chunk by chunk into ``output_path`` (atomic).

    Returns
    -------
    {"rows": rows predicted, "empty_text": rows whose text was empty (kept, as in training)}.
    """
    counts = {"rows": 0, "empty_text": 0}
    with (atomic_path(output_path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as out,
          tqdm(desc="predict", unit="rows") as bar):
        for chunk in read_chunks(input_path, chunk_rows):
            ds = predictor.parse(chunk, source=input_path.name, first_row=counts["rows"])
            predictor.predict_frame(ds).to_csv(out, header=counts["rows"] == 0, index=False)
            counts["rows"] += len(ds)
            counts["empty_text"] += ds.stats["empty_text"]
            bar.update(len(ds))
        if counts["rows"] == 0:
            raise HybridstackError(f"--input: {input_path} has a header but no rows")
    return counts
