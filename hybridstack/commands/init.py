"""``hybridstack init``: write a ready config for a Kaggle-style competition folder.

Detection reads only the first few thousand rows of the train file. It works from
the column names first (the LMSYS and Jigsaw layouts, common names such as
``text`` or ``label``) and falls back to the data (the longest text column, a column
with few distinct values). Anything it cannot decide alone is an error that names
the flag to set. The written config is validated before it is written, atomically.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hybridstack.config import (
    JIGSAW_LABELS,
    PAIRWISE_LABELS,
    apply_override,
    config_from_dict,
    dump_toml,
)
from hybridstack.errors import HybridstackError
from hybridstack.models import EMBEDDED_MINILM, find_model, is_under_input_root, kaggle_working_dir
from hybridstack.recipes import RECIPES, Recipe, finetune_recipe_for, load_recipe
from hybridstack.runs import write_text
from hybridstack.tables import iter_table, table_file_names

DETECT_ROWS = 5000  # enough rows to judge column types without parsing a 1 GB train file
# plain or compressed as Kaggle ships them (Jigsaw: train.csv.zip)
TRAIN_FILES = table_file_names("train")
TEST_FILES = table_file_names("test")
SAMPLE_FILES = table_file_names("sample_submission")

PAIRWISE_TEXT = ["prompt", "response_a", "response_b"]
ID_NAMES = {"id", "qid", "row_id", "uid", "index"}
TEXT_NAMES = {"text", "comment_text", "comment", "review", "review_text", "sentence", "content",
              "body", "document", "message", "tweet", "full_text", "essay", "excerpt"}
LABEL_NAMES = {"label", "labels", "target", "class", "y", "category", "sentiment", "polarity",
               "rating", "stance", "intent", "topic"}
MAX_CLASSES = 50  # a column with more distinct values is not taken for a class label

# Reference models (docs/ARCHITECTURE.md) and the embedded fallback that ships with the package.
REFERENCE_EMBED = ("intfloat/e5-small-v2", "query: ")  # e5 was trained with this prefix
REFERENCE_FINETUNE = {"pairwise": "microsoft/deberta-v3-small",
                      "multiclass": "microsoft/deberta-v3-small",
                      "multilabel": "microsoft/mdeberta-v3-base"}  # multilingual toxicity

# Without a GPU: short inputs, a 3000-row subsample of each fold, one epoch, so a fold takes a
# few minutes. Measured on jigsaw-toxic-10k with MiniLM on 2 CPU cores (~36 samples/s at 96
# tokens): lr 5e-5 barely moves the new head in one short epoch (OOF AUC 0.63), 1e-4 learns
# (0.87 on 3000 rows); per-label class weights starve the common labels of gradient on so few
# steps. Every fold (no `folds` key), not fold 0 alone: the stacker then weighs the fine-tune
# on all rows at level 1, and the stack's CV rose on both real datasets (jigsaw-toxic-10k
# 0.95695 -> 0.95949 over 8,000 rows; llmeval2-pairwise 0.8851 -> 0.8829 log loss over 2,046),
# for 5x the fine-tune's time (README "Leaderboard on real data").
CPU_FINETUNE: dict[str, Any] = {"max_length": 128, "epochs": 1,
                                "max_train_rows": 3000, "batch_size": 16, "lr": 1e-4,
                                "warmup_ratio": 0.1, "class_weighted_bce": False}
# Multilabel: two epochs of up to 6,000 rows a fold (all 5,760 fitting rows of jigsaw-toxic-10k)
# took the fine-tune from 0.8713 to 0.8923 and the level-1 stack from 0.95951 to 0.96058 (nested
# CV mean ROC-AUC over 8,000 rows, every outer fold but one up), for 2,577 s against 953 s for
# the five folds on 2 cores. The cap keeps a larger competition's CPU fine-tune bounded.
# One epoch of a second 3,000-row draw (another seed) left the stack at 0.95951, so it is the
# longer training, not a second model, that pays. Pairwise was not measured: it keeps the above.
CPU_FINETUNE_BY_KIND: dict[str, dict[str, Any]] = {
    "multilabel": {"epochs": 2, "max_train_rows": 6000},
}
# -- finding and reading the files --------------------------------------------------------


@dataclass
class CompetitionFiles:
    train: Path
    test: Path | None
    sample_submission: Path | None


def find_competition_files(folder: Path) -> CompetitionFiles:
    """The train file (required), test file and sample submission in ``folder``."""
    if not folder.is_dir():
        raise HybridstackError(f"competition folder not found: {folder} (pass the folder that holds train.csv)")

    def first(names: tuple[str, ...]) -> Path | None:
        return next((folder / n for n in names if (folder / n).is_file()), None)

    train = first(TRAIN_FILES)
    if train is None:
        raise HybridstackError(f"{folder} has no {' or '.join(TRAIN_FILES)}; pass a Kaggle-style competition folder")
    return CompetitionFiles(train, first(TEST_FILES), first(SAMPLE_FILES))


def read_head(path: Path, delimiter: str | None = None, column_names: list[str] | None = None,
              nrows: int = DETECT_ROWS) -> pd.DataFrame:
    """The first ``nrows`` rows, every cell a ``str`` (``tables.iter_table``'s rules)."""
    (frame,) = iter_table(path, delimiter, column_names, nrows=nrows, names_from="--columns",
                          hint="pass --delimiter")
    return frame


def check_header(path: Path, columns: list[str]) -> None:
    """Refuse a first line that looks like data rather than column names."""
    suspicious = [c for c in columns if _looks_like_data(c)]
    if suspicious:
        raise HybridstackError(
            f"{path.name}: the first line looks like data, not a header ({suspicious[0][:40]!r}); if the "
            "file has no header row, pass --no-header --columns NAME,NAME,..."
        )


def _looks_like_data(name: str) -> bool:
    """A number, a long string or a phrase; "Unnamed: 0" (a saved pandas index) is a real header."""
    if name.startswith("Unnamed: "):
        return False
    if len(name) > 64 or len(name.split()) > 4:
        return True
    try:
        float(name)
    except ValueError:
        return False
    return True


# -- detection ----------------------------------------------------------------------------


@dataclass
class Detection:
    """What ``init`` found: the task kind and the role of each column, with the reasons."""

    kind: str
    id_column: str
    text_columns: list[str]  # pairwise: prompt, response A, response B
    label_columns: list[str]  # pairwise: the 3 winner columns; multiclass: the one label column
    reasons: list[str] = field(default_factory=list)

    def task_section(self) -> dict[str, Any]:
        section: dict[str, Any] = {"kind": self.kind, "id_column": self.id_column}
        if self.kind == "pairwise":
            section.update(prompt_column=self.text_columns[0], response_columns=self.text_columns[1:],
                           winner_columns=self.label_columns)
        elif self.kind == "multilabel":
            section.update(text_columns=self.text_columns, label_columns=self.label_columns)
        else:
            section.update(text_columns=self.text_columns, label_column=self.label_columns[0])
        return section


@dataclass
class DetectionHints:
    """The user's flags; anything given here is taken as is, never second-guessed."""

    kind: str | None = None
    id_column: str | None = None
    text_columns: list[str] = field(default_factory=list)
    label_columns: list[str] = field(default_factory=list)


def detect(train: pd.DataFrame, test_columns: list[str] | None, hints: DetectionHints) -> Detection:
    """Decide the task kind and the id, text and label columns from the first train rows.

    Parameters
    ----------
    train : pandas.DataFrame
        ``(n_rows, n_columns)`` head of the train file, cells as ``str``.
    test_columns : list of str or None
        The test file's columns (labels are the train columns missing from it), if any.
    hints : DetectionHints
        The user's flags.

    Returns
    -------
    Detection
        The kind, the columns of each role and one line of reason per choice.
    """
    columns = list(train.columns)
    _require(columns, [c for c in [hints.id_column, *hints.text_columns, *hints.label_columns] if c])
    kind, why = _detect_kind(columns, hints)
    id_column = hints.id_column or _detect_id(train)
    if kind == "pairwise":
        text = hints.text_columns or PAIRWISE_TEXT
        labels = hints.label_columns or list(PAIRWISE_LABELS)
        _require(columns, text + labels, flag="--text-column (3 times) and --label-column (3 times)")
        if len(text) != 3 or len(labels) != 3:
            raise HybridstackError("pairwise needs 3 --text-column (prompt, response A, response B) "
                                   "and 3 --label-column (A wins, B wins, tie)")
        reasons = [why, f"labels: {', '.join(labels)}", f"text: {', '.join(text)}"]
        return Detection(kind, id_column, list(text), list(labels), reasons)
    candidates = [c for c in columns if c != id_column and c not in hints.text_columns
                  and (test_columns is None or c not in test_columns)]
    if kind == "multiclass" and len(hints.label_columns) > 1:
        raise HybridstackError("multiclass takes one --label-column; for several 0/1 labels pass --kind multilabel")
    if hints.label_columns:
        labels = list(hints.label_columns)
    elif kind == "multilabel":
        labels = _detect_multilabel(train, candidates)
    else:
        labels = [_detect_label(train, candidates, test_columns is not None)]
    text_candidates = [c for c in columns if c != id_column and c not in labels
                       and (test_columns is None or c in test_columns)]
    text = hints.text_columns or [_detect_text(train, text_candidates)]
    reasons = [why, f"labels: {', '.join(labels)}", f"text: {', '.join(text)}"]
    return Detection(kind, id_column, text, labels, reasons)


def _require(columns: list[str], needed: list[str], flag: str = "the column flags") -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise HybridstackError(f"train file has no column(s) {', '.join(map(repr, missing))} "
                               f"(found {', '.join(columns[:10])}); check {flag}")


def _detect_kind(columns: list[str], hints: DetectionHints) -> tuple[str, str]:
    if hints.kind:
        return hints.kind, f"kind {hints.kind} (--kind)"
    if len(hints.label_columns) == 3 and len(hints.text_columns) == 3:
        return "pairwise", "kind pairwise (3 text and 3 label columns given)"
    if len(hints.label_columns) > 1:
        return "multilabel", "kind multilabel (several --label-column given)"
    if len(hints.label_columns) == 1:
        return "multiclass", "kind multiclass (one --label-column given)"
    pairwise_columns = PAIRWISE_TEXT + PAIRWISE_LABELS
    found = [c for c in pairwise_columns if c in columns]
    if len(found) == len(pairwise_columns):
        return "pairwise", "kind pairwise (LMSYS layout: prompt, response_a/b, winner_model_a/b/tie)"
    if set(PAIRWISE_LABELS) & set(found):
        missing = [c for c in pairwise_columns if c not in columns]
        raise HybridstackError(f"looks like an LMSYS file but lacks {', '.join(missing)}; pass --kind pairwise "
                               "with 3 --text-column and 3 --label-column")
    if all(c in columns for c in JIGSAW_LABELS):
        return "multilabel", "kind multilabel (Jigsaw layout: the six toxicity labels)"
    return "multiclass", "kind multiclass (one text and one label column; pass --kind to change)"


def _detect_id(train: pd.DataFrame) -> str:
    named = [c for c in train.columns if c.lower() in ID_NAMES or c.lower().endswith("_id")]
    exact = [c for c in named if c.lower() == "id"]
    candidates = exact or [c for c in named if train[c].is_unique]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise HybridstackError("no id column found (a unique column named id); pass --id-column "
                               "(every row needs a unique id: add one to the CSV if it has none)")
    raise HybridstackError(f"several candidate id columns ({', '.join(candidates)}); pass --id-column")


def _is_binary(values: pd.Series) -> bool:
    return bool(values.str.strip().isin(["0", "1"]).all())


def _detect_multilabel(train: pd.DataFrame, candidates: list[str]) -> list[str]:
    if all(c in train.columns for c in JIGSAW_LABELS):
        return list(JIGSAW_LABELS)
    binary = [c for c in candidates if _is_binary(train[c])]
    if len(binary) < 2:
        raise HybridstackError("multilabel needs several 0/1 label columns; found "
                               f"{binary or 'none'}; pass --label-column once per label")
    return binary


def _detect_label(train: pd.DataFrame, candidates: list[str], from_test: bool) -> str:
    """One label column: the only train-only column, a conventional name, or few distinct values."""
    if from_test and len(candidates) == 1:
        return candidates[0]
    named = [c for c in candidates if c.lower() in LABEL_NAMES]
    if len(named) > 1:
        raise HybridstackError(f"several candidate label columns ({', '.join(named)}); pass --label-column")
    if named:
        return named[0]
    few_values = [c for c in candidates
                  if 2 <= train[c].nunique() <= MAX_CLASSES and train[c].nunique() < 0.5 * len(train)]
    if len(few_values) == 1:
        return few_values[0]
    if not few_values:
        raise HybridstackError("no label column found (named label/target/class, or with few distinct "
                               "values); pass --label-column")
    raise HybridstackError(f"several candidate label columns ({', '.join(few_values)}); pass --label-column "
                           "(repeat it with --kind multilabel for several 0/1 labels)")


def _detect_text(train: pd.DataFrame, candidates: list[str]) -> str:
    """The text column: a conventional name, else the longest strings on average."""
    named = [c for c in candidates if c.lower() in TEXT_NAMES]
    if len(named) > 1:
        raise HybridstackError(f"several candidate text columns ({', '.join(named)}); pass --text-column "
                               "(repeat it to join several)")
    if named:
        return named[0]
    textual = [c for c in candidates if pd.to_numeric(train[c], errors="coerce").isna().any()]
    if not textual:
        raise HybridstackError("no text column found (all remaining columns are numeric); pass --text-column")
    return max(textual, key=lambda c: train[c].str.len().mean())


def check_other_files(files: CompetitionFiles, det: Detection, test_columns: list[str] | None) -> None:
    """The test file must hold the id and text columns; the sample submission the id."""
    if test_columns is not None:
        missing = [c for c in [det.id_column, *det.text_columns] if c not in test_columns]
        if missing:
            raise HybridstackError(f"{files.test.name} has no column(s) {', '.join(map(repr, missing))}; pass "
                                   "--id-column/--text-column with columns that train and test both have")
    if files.sample_submission is not None:
        sample_columns = read_head(files.sample_submission, nrows=1).columns
        if det.id_column not in sample_columns:
            raise HybridstackError(f"{files.sample_submission.name} has no id column {det.id_column!r}; "
                                   "pass --id-column")


# -- models and recipe --------------------------------------------------------------------


def choose_model(reference: str, key: str) -> tuple[str, str]:
    """``reference`` when it resolves offline, else the embedded MiniLM; with the reason."""
    found = find_model(reference)
    if found is not None:
        return reference, f"{key} = {reference} (found at {found})"
    if find_model(EMBEDDED_MINILM) is None:
        return reference, (f"{key} = {reference}: NOT available offline and no embedded fallback; "
                           f"run `hf download {reference}` before that stage")
    return EMBEDDED_MINILM, (f"{key} = {EMBEDDED_MINILM} ({reference} is not available offline; "
                             f"download it with `hf download {reference}` for better scores)")


def _embed_section(embed_model: str) -> dict[str, Any]:
    if embed_model == REFERENCE_EMBED[0]:
        return {"model": embed_model, "prefix": REFERENCE_EMBED[1]}
    # MiniLM was trained on 256-token inputs: longer ones cost time and add nothing
    return {"model": embed_model, "prefix": "", "max_seq_length": 256}


# TF-IDF settings each task kind gets beyond the defaults, kept only where they helped on CV
# on the real data of ../shared/data (README "Leaderboard on real data"); never decided on
# test labels. multilabel: NB-SVM next to the logistic regression took jigsaw-toxic-10k's
# level-1 stack from 0.9538 to 0.9559 (nested CV mean ROC-AUC, 8,000 rows); tfidf.shape_features
# then to 0.9565 (the TF-IDF model 0.9434 -> 0.9448, NB-SVM 0.9315 -> 0.9330: short, shouty
# comments), and a second, class-balanced logistic regression to 0.95695 (0.9591 -> 0.9595 with
# the fine-tune on every fold). pairwise: C = 0.25
# instead of 4: llmeval2-pairwise's TF-IDF CV log loss 0.9160 against 0.9841 (C = 1: 0.9282,
# 0.1: 0.9308; 2,046 rows), its stack 0.8851 against 0.8853 (the stacker had calibrated the
# overconfident model), and lbfgs converges sooner (the stage 78 s against 147 s; at the
# full LMSYS size 3,469 s against 4,828 s). tfidf.shape_features made the pairwise TF-IDF
# model worse (0.9921 vs 0.9841 at C = 4; the embed heads already see the lengths), so it
# stays off. Multiclass: nothing measured, the default C = 4.
PAIRWISE_TFIDF_C = 0.25
TFIDF_EXTRAS: dict[str, tuple[dict[str, Any], str]] = {
    "multilabel": ({"shape_features": True,
                    "models": [{"name": "tfidf_logreg"},
                               {"name": "tfidf_logreg_balanced", "class_weight": "balanced"}],
                    "nbsvm": [{"name": "tfidf_nbsvm"}]},
                   "tfidf: + shape features, a class-balanced logistic regression "
                   "(tfidf_logreg_balanced) and NB-SVM (tfidf_nbsvm): each raised the Jigsaw stack's CV"),
    "pairwise": ({"models": [{"name": "tfidf_logreg", "C": PAIRWISE_TFIDF_C}]},
                 f"tfidf: C = {PAIRWISE_TFIDF_C} (not 4): a calibrated TF-IDF model on pairwise CV"),
}


def tfidf_section(kind: str) -> tuple[dict[str, Any], str | None]:
    section, why = TFIDF_EXTRAS.get(kind, ({}, None))
    return {"enabled": True, **section}, why


def finetune_recipe(kind: str, gpu: bool) -> tuple[dict[str, Any], str]:
    if gpu:
        recipe = finetune_recipe_for(kind)
        recipe.pop("model", None)  # the model is chosen by what resolves offline
        return recipe, "finetune: GPU -> the packaged recipe's settings (" + _show(recipe) + ")"
    recipe = {**CPU_FINETUNE, **CPU_FINETUNE_BY_KIND.get(kind, {})}
    return recipe, ("finetune: no GPU -> sized to finish in minutes (" + _show(recipe)
                    + "); pass --gpu for the full recipe")


def _show(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _gpu_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# -- the config ---------------------------------------------------------------------------


def _config_path_value(path: Path, config_dir: Path) -> str:
    """Relative to the config's folder when below it (the pair moves together), else absolute."""
    resolved = path.resolve()
    if resolved.is_relative_to(config_dir):
        return resolved.relative_to(config_dir).as_posix()
    return str(resolved)


def _experiment_name(folder: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.resolve().name) or "experiment"


@dataclass
class InitOptions:
    competition_dir: Path
    output: Path = Path("config.toml")
    hints: DetectionHints = field(default_factory=DetectionHints)
    column_names: list[str] | None = None  # set: the files have no header row
    delimiter: str | None = None
    experiment: str | None = None
    gpu: bool | None = None  # None: torch.cuda.is_available()
    overrides: list[str] = field(default_factory=list)
    force: bool = False
    recipe: str | None = None  # a packaged recipe (hybridstack/recipes/<name>.toml)


def build_config(opts: InitOptions) -> tuple[dict[str, Any], list[str]]:
    """The raw config dict for ``opts`` and the lines that explain each choice."""
    recipe = load_recipe(opts.recipe) if opts.recipe else None
    if recipe is not None:
        if opts.hints.kind and opts.hints.kind != recipe.kind:
            raise HybridstackError(f"--recipe {recipe.name} is for {recipe.kind} tasks, not "
                                   f"--kind {opts.hints.kind}; drop one of the two")
        opts.hints.kind = recipe.kind
    files = find_competition_files(opts.competition_dir)
    train = read_head(files.train, opts.delimiter, opts.column_names)
    if opts.column_names is None:
        check_header(files.train, list(train.columns))
        test_columns = list(read_head(files.test, opts.delimiter, nrows=1).columns) if files.test else None
    else:
        test_columns = None  # a header-less test file has no names to compare
    det = detect(train, test_columns, opts.hints)
    if opts.column_names is None:
        check_other_files(files, det, test_columns)
    config_dir = opts.output.resolve().parent
    data: dict[str, Any] = {key: _config_path_value(path, config_dir)
                            for key, path in vars(files).items() if path is not None}
    if opts.delimiter:
        data["delimiter"] = opts.delimiter
    if opts.column_names:
        data["column_names"] = opts.column_names
    raw: dict[str, Any] = {"experiment": opts.experiment or (recipe.name if recipe else
                                                             _experiment_name(opts.competition_dir))}
    notes = [f"{files.train.name}: {len(train)} rows read for detection, {len(train.columns)} columns",
             *det.reasons, f"id: {det.id_column}"]
    if is_under_input_root(opts.competition_dir):
        # Kaggle: inputs are read-only, runs go to the working folder, and the blend is
        # copied to where Kaggle reads the submission
        working = kaggle_working_dir()
        raw.update(workdir=str(working), submission=str(working / "submission.csv"))
        notes.append(f"under the input root: workdir {working}, submission {raw['submission']}")
    raw.update(task=det.task_section(), data=data)
    if recipe is not None:
        notes += [f"recipe {recipe.name}: every other setting from hybridstack/recipes/"
                  f"{recipe.name}.toml", *_model_availability(recipe)]
        return _merge(raw, recipe.sections), notes
    embed_model, embed_why = choose_model(REFERENCE_EMBED[0], "embed.model")
    finetune_model, finetune_why = choose_model(REFERENCE_FINETUNE[det.kind], "finetune.model")
    gpu = _gpu_available() if opts.gpu is None else opts.gpu
    settings, settings_why = finetune_recipe(det.kind, gpu)
    tfidf, tfidf_why = tfidf_section(det.kind)
    raw.update(cv={"n_splits": 5, "seed": 42}, tfidf=tfidf, embed=_embed_section(embed_model),
               finetune={"model": finetune_model, **settings})
    return raw, [*notes, *([tfidf_why] if tfidf_why else []), embed_why, finetune_why,
                 settings_why]


def _model_availability(recipe: Recipe) -> list[str]:
    """A recipe keeps its models; say for each whether it resolves offline here."""
    lines = []
    for section in ("embed", "finetune"):
        name = recipe.sections[section]["model"]
        found = find_model(name)
        lines.append(f"{section}.model = {name} (found at {found})" if found else
                     f"{section}.model = {name}: NOT available offline yet; attach it under the "
                     f"input root (e.g. as a Kaggle model) or `hf download {name}` before that stage")
    return lines


def init_config(opts: InitOptions) -> Path:
    """Detect, validate and atomically write the config; print what was chosen and why."""
    if opts.output.exists() and not opts.force:
        raise HybridstackError(f"{opts.output} exists; pass --force to overwrite it or -o to write elsewhere")
    raw, notes = build_config(opts)
    for item in opts.overrides:
        apply_override(raw, item)
    config_from_dict(raw, base_dir=opts.output.resolve().parent, source=str(opts.output))
    write_text(opts.output, config_text(opts, raw))
    for line in notes:
        print(line)
    print(f"wrote {opts.output}; next: hybridstack run all -c {opts.output}")
    return opts.output


def config_text(opts: InitOptions, raw: dict[str, Any]) -> str:
    """The file ``init`` writes: a header, then the config (a recipe keeps its comments)."""
    command = f"hybridstack init {opts.competition_dir}" + (f" --recipe {opts.recipe}" if opts.recipe else "")
    header = (f"# written by `{command}`; every key is documented in hybridstack/config.py\n"
              "# relative paths are read from this file's folder\n\n")
    if opts.recipe is None or opts.overrides:
        return header + dump_toml(raw)  # --set values are merged, so the recipe's comments go
    own = _without(raw, load_recipe(opts.recipe).sections)
    return header + dump_toml(own) + "\n" + load_recipe(opts.recipe).text


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``, section by section (nested tables merged, not replaced)."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _without(raw: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """What ``raw`` holds beyond ``sections`` (the inverse of :func:`_merge`)."""
    out = {}
    for key, value in raw.items():
        if key not in sections:
            out[key] = value
        elif isinstance(value, dict) and isinstance(sections[key], dict):
            rest = _without(value, sections[key])
            if rest:
                out[key] = rest
    return out


# -- command line -------------------------------------------------------------------------


def _options_from_args(args: argparse.Namespace) -> InitOptions:
    if args.no_header != bool(args.columns):
        raise HybridstackError("--no-header and --columns go together: pass --no-header --columns a,b,c")
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    delimiter = "\t" if args.delimiter in ("\\t", "tab") else args.delimiter
    hints = DetectionHints(args.kind, args.id_column, args.text_column, args.label_column)
    return InitOptions(Path(args.competition_dir), Path(args.output), hints, columns, delimiter,
                       args.experiment, args.gpu, args.set, args.force, args.recipe)


def cmd_init(args: argparse.Namespace) -> None:
    init_config(_options_from_args(args))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("init", help="write a config for a Kaggle-style competition folder")
    p.add_argument("competition_dir", help="folder with train.csv (or .tsv), optional test.csv, sample_submission.csv")
    p.add_argument("-o", "--output", default="config.toml", help="config file to write (default: ./config.toml)")
    p.add_argument("--kind", choices=["pairwise", "multilabel", "multiclass"], help="task kind (default: detected)")
    p.add_argument("--id-column", help="the unique row id column")
    p.add_argument("--text-column", action="append", default=[], help="a text column (repeatable)")
    p.add_argument("--label-column", action="append", default=[], help="a label column (repeatable)")
    p.add_argument("--no-header", action="store_true", help="the files have no header row (needs --columns)")
    p.add_argument("--columns", help="comma-separated column names for --no-header files")
    p.add_argument("--delimiter", help=r"field delimiter (default: by extension, else sniffed; '\t' for tab)")
    p.add_argument("--experiment", help="experiment name (default: the folder's name)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="write a packaged competition recipe (models and every setting) for this folder")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="size the fine-tune for a GPU (the recipe of the detected kind) or for CPU "
                        "(default: detected)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a written value, e.g. --set cv.n_splits=10")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_init)
