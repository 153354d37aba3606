"""``hybridstack predict``: score one text, one pair, or a CSV with a finished experiment.

A batch (``--input``) is read in chunks (bounded memory on 10^5+ rows); ``--output`` gets
probabilities and labels, ``--submission`` exactly the sample submission's columns (what a
Kaggle code competition scores), both only when every row succeeded (predict/batch.py).
The run folder and its workdir are only read: new embeddings go to ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridstack.errors import HybridstackError
from hybridstack.predict.batch import (
    DEFAULT_CHUNK_ROWS,
    check_ids_match,
    input_ids,
    predict_file,
    predict_file_in_processes,
    read_sample,
)
from hybridstack.predict.source import DEFAULT_CACHE_DIR, open_run
from hybridstack.tasks import Task

if TYPE_CHECKING:
    from hybridstack.predict.predictor import Predictor



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
    parser.add_argument("--submission",
                        help="with --input: CSV with exactly the sample submission's columns, in "
                             "the input's id order (e.g. /kaggle/working/submission.csv)")
    parser.add_argument("--sample", help="with --submission: the sample submission (default: "
                                         "the one in the run's config)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="where embeddings of texts the run did not cache are written "
                             f"(default ./{DEFAULT_CACHE_DIR}); the run's own cache is only read")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="with --input: split the rows over N processes, one GPU each")
    parser.add_argument("--cpu", action="store_true",
                        help="with --num-processes: CPU processes instead of GPUs")
    parser.add_argument("--explain", action="store_true",
                        help="with --text/--pair: n-grams, feature contributions, stack shares")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help=f"with --input: rows per chunk (default {DEFAULT_CHUNK_ROWS})")
    parser.add_argument("--base-model", metavar="FOLDER",
                        help="LoRA models: the base model folder their adapters were trained on "
                             "(default: found by its recorded id, e.g. under /kaggle/input); "
                             "checked against the recorded fingerprint")
    parser.add_argument("--quantization", choices=["4bit", "8bit"],
                        help="LoRA models on CUDA: load the base in 4/8-bit (bitsandbytes), "
                             "e.g. a 9B model on a 16 GB T4")
    parser.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> None:
    check_arguments(args)
    with lora_options(args):
        _predict(args)


def _predict(args: argparse.Namespace) -> None:
    from hybridstack.predict.predictor import load  # torch & co. only when predicting

    if args.input:
        predict_batch(args)
        return
    task = open_run(args.experiment_dir).task  # cheap: wrong-mode errors come before loading
    row = text_row(task, args.text) if args.text is not None else pair_row(task, args.pair)
    predictor = load(args.experiment_dir, args.cache_dir)
    if args.explain:
        print(format_explanation(predictor, predictor.explain(row)[0]))
    else:
        frame = predictor.predict_frame(row)
        probabilities = dict(zip(predictor.label_names, frame[predictor.label_names].iloc[0]))
        print(format_prediction(predictor, probabilities))


def predict_batch(args: argparse.Namespace) -> None:
    """``--input`` to ``--output`` and/or ``--submission``, on one process or several."""
    from hybridstack.predict.predictor import load

    ctx = open_run(args.experiment_dir, args.cache_dir)
    sample = None
    if args.submission:
        sample = read_sample(sample_path(args, ctx.cfg.data.sample_submission), ctx.task)
        # before any model loads: a mismatch found after hours of scoring helps nobody
        check_ids_match(ctx.task, input_ids(ctx.task, Path(args.input)), sample)
    output = Path(args.output) if args.output else None
    submission = Path(args.submission) if args.submission else None
    if args.num_processes > 1:
        result = predict_file_in_processes(ctx.dir.path, Path(args.input), output, submission,
                                           sample, ctx.task, ctx.cache_dir, args.num_processes,
                                           args.cpu, args.chunk_rows)
    else:
        result = predict_file(load(args.experiment_dir, args.cache_dir), Path(args.input),
                              output, submission, sample, args.chunk_rows)
    written = " and ".join(str(p) for p in (output, submission) if p is not None)
    print(f"predicted {result.rows} rows -> {written} "
          f"({result.empty_text} with empty text, kept as empty text)")


def sample_path(args: argparse.Namespace, configured: Path | None) -> Path:
    """``--sample``, else the sample submission named in the run's config; it must exist."""
    path = Path(args.sample) if args.sample else configured
    if path is None:
        raise HybridstackError("--submission needs the sample submission: the run's config "
                               "names none; pass --sample sample_submission.csv")
    if not path.is_file():
        hint = "pass the competition's sample with --sample" if not args.sample else "check the path"
        raise HybridstackError(f"sample submission not found: {path}; {hint}")
    return path


# the environment names read by hybridstack.finetune.lora (not imported here: no torch yet)
BASE_MODEL_ENV = "HYBRIDSTACK_BASE_MODEL"
QUANTIZATION_ENV = "HYBRIDSTACK_PREDICT_QUANTIZATION"


@contextlib.contextmanager
def lora_options(args: argparse.Namespace) -> Iterator[None]:
    """--base-model / --quantization as environment variables while predicting (row-split
    processes inherit them); the previous values come back afterwards."""
    wanted = {}
    base = getattr(args, "base_model", None)
    if base:
        if not (Path(base) / "config.json").is_file():
            raise HybridstackError(f"--base-model {base}: no config.json there; point it at the "
                                   "base model folder the adapters were trained on")
        wanted[BASE_MODEL_ENV] = str(Path(base).resolve())
    if getattr(args, "quantization", None):
        wanted[QUANTIZATION_ENV] = args.quantization
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work, before any model is loaded."""
    if args.input and not (args.output or args.submission):
        raise HybridstackError("--input needs --output (probabilities and labels) and/or "
                               "--submission (the sample submission's columns)")
    if (args.output or args.submission) and not args.input:
        raise HybridstackError("--output goes with --input (so does --submission); --text/--pair "
                               "print their result")
    if args.sample and not args.submission:
        raise HybridstackError("--sample goes with --submission")
    if args.num_processes < 1:
        raise HybridstackError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes > 1 and not args.input:
        raise HybridstackError("--num-processes splits the rows of --input; one text needs one process")
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
