"""Task kinds: the only place that knows a competition's file format.

A task reads and validates train/test tables, renders their text fields, turns
labels into a float32 ``(n, C)`` target, scores predictions, and writes
``submission.csv``. Heads, stages and stackers never look at columns.
"""

from __future__ import annotations

import json
import logging
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from hybridstack.config import CleanConfig, Config, TaskConfig
from hybridstack.errors import HybridstackError
from hybridstack.tables import Table, require_columns
from hybridstack.text import clean_text, replace_lone_surrogates

log = logging.getLogger(__name__)



# -- the pairwise swap view: every model's augmentation and test-time averaging -----------


def swapped_targets(Y: np.ndarray, permutation: list[int]) -> np.ndarray:
    """The targets of the A/B-swapped rows (``winner_a`` becomes ``winner_b``)."""
    return Y[:, permutation]


def average_with_swapped(predict: Callable[[Any], np.ndarray], view: Any,
                         swapped_view: Any | None, permutation: list[int] | None) -> np.ndarray:
    """Swap TTA: ``predict(view)`` averaged with ``predict(swapped_view)`` mapped back through
    ``permutation``; just ``predict(view)`` without a swapped view. float32."""
    pred = np.asarray(predict(view), dtype=np.float32)
    if swapped_view is not None and permutation is not None:
        swapped = np.asarray(predict(swapped_view), dtype=np.float32)
        pred = (pred + swapped[:, permutation]) / 2
    return pred


@dataclass
class Dataset:
    """One parsed split. ``fields`` holds the cleaned text segments the task renders."""

    ids: np.ndarray  # (n,) str
    fields: dict[str, list[str]]  # e.g. {"text": [...]} or {"prompt", "response_a", "response_b"}
    Y: np.ndarray | None  # (n, C) float32 target; None for unlabelled data
    groups: np.ndarray | None = None  # (n,) fold groups (pairwise: the prompt)
    stats: dict[str, int] = field(default_factory=dict)
    # pairwise: each field's cleaned turns for rows with more than one turn (None: one turn,
    # the field's text); the turn-aware rendering of decoder backbones interleaves them
    turns: dict[str, list[tuple[str, ...] | None]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: np.ndarray) -> Dataset:
        return Dataset(
            ids=self.ids[rows],
            fields={k: [v[i] for i in rows] for k, v in self.fields.items()},
            Y=None if self.Y is None else self.Y[rows],
            groups=None if self.groups is None else self.groups[rows],
            stats=dict(self.stats),
            turns=None if self.turns is None else {k: [v[i] for i in rows]
                                                   for k, v in self.turns.items()},
        )


class Task(ABC):
    """Base class: shared reading, cleaning, id checks, metrics and submissions."""

    kind: str
    metric_name: str
    greater_is_better: bool
    # pairwise only: the two fields swapped for augmentation and the label permutation
    swap_fields: tuple[str, str] | None = None
    swap_permutation: list[int] | None = None

    def __init__(self, cfg: TaskConfig, clean: CleanConfig):
        self.cfg = cfg
        self.clean = clean
        # what parse() had to normalise in the table being parsed (logged and kept in stats)
        self._odd_text: Counter[str] = Counter()

    # -- columns -----------------------------------------------------------------------
    @property
    @abstractmethod
    def label_names(self) -> list[str]:
        """The C probability columns, in order."""

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    @property
    def field_names(self) -> list[str]:
        return ["text"]

    @abstractmethod
    def text_columns(self) -> list[str]:
        """Input columns needed to render the text fields."""

    @abstractmethod
    def label_columns(self) -> list[str]:
        """Columns holding the target (train only)."""

    # -- parsing -----------------------------------------------------------------------
    def parse(self, table: Table, labelled: bool) -> Dataset:
        """Validate ``table`` and return the Dataset (``labelled``: read the target too)."""
        frame = table.frame
        self._odd_text = Counter()
        needed = [*self.text_columns(), *(self.label_columns() if labelled else [])]
        require_columns(table, needed, hint="set the column names in [task]")
        if self.cfg.id_column in frame.columns:
            ids = frame[self.cfg.id_column].astype(str).to_numpy()
            _check_unique_ids(ids, table.path.name, self.cfg.id_column)
        else:
            # plain text+label CSVs often have no id: the row number serves as one
            log.info("%s: no id column '%s'; using the row number as id", table.path.name,
                     self.cfg.id_column)
            ids = np.arange(len(frame)).astype(str)
        fields = self.render_fields(frame, table.path.name)
        n_empty = _count_empty(fields)
        if n_empty:
            log.warning("%s: %d rows have empty or missing text (kept as empty text)",
                        table.path.name, n_empty)
        Y = self.parse_target(frame, ids, table.path.name) if labelled else None
        for what, count in sorted(self._odd_text.items()):
            # null turns are routine in LMSYS (unanswered turns); the rest is worth a look
            level = logging.DEBUG if what == "turns_null" else logging.WARNING
            log.log(level, "%s: %d %s", table.path.name, count, ODD_TEXT_NOTES[what])
        stats = {"rows": len(ids), "empty_text": n_empty, "bad_bytes": table.n_bad_bytes,
                 **self._odd_text}
        return Dataset(ids=ids, fields=fields, Y=Y, groups=self.groups(fields), stats=stats,
                       turns=self._take_turns())

    def _take_turns(self) -> dict[str, list[tuple[str, ...] | None]] | None:
        """The turns the last :meth:`render_fields` split (pairwise tasks), handed over once."""
        turns, self._turns = getattr(self, "_turns", None), None
        return turns

    def _clean(self, values) -> list[str]:
        """Cleaned text; lone surrogates become U+FFFD first (counted), so no tokenizer fails."""
        out = []
        for value in values:
            value, n_surrogates = replace_lone_surrogates(value)
            if n_surrogates:
                self._odd_text["lone_surrogates"] += n_surrogates
            out.append(clean_text(value, self.clean))
        return out

    @abstractmethod
    def render_fields(self, frame: pd.DataFrame, source: str) -> dict[str, list[str]]: ...

    @abstractmethod
    def parse_target(self, frame: pd.DataFrame, ids: np.ndarray, source: str) -> np.ndarray: ...

    def groups(self, fields: dict[str, list[str]]) -> np.ndarray | None:
        return None

    def stratify_target(self, Y: np.ndarray) -> np.ndarray:
        """What folds stratify on: class index (single-label) or the label matrix."""
        return Y.argmax(axis=1)

    # -- text renderings -------------------------------------------------------------------
    def joined_text(self, ds: Dataset) -> list[str]:
        """One string per row (for de-duplication and single-text models)."""
        return ["\n\n".join(parts) for parts in zip(*(ds.fields[f] for f in self.field_names))]

    # -- metric ----------------------------------------------------------------------------
    @abstractmethod
    def score(self, Y: np.ndarray, P: np.ndarray) -> float:
        """The competition metric of probabilities ``P`` against target ``Y``."""

    def metrics(self, Y: np.ndarray, P: np.ndarray) -> dict[str, float]:
        """The competition metric under ``metric`` plus a few readable extras."""
        return {"metric": self.score(Y, P)}

    def is_better(self, a: float, b: float) -> bool:
        return a > b if self.greater_is_better else a < b

    # -- submission ------------------------------------------------------------------------
    def submission_frame(self, ids: np.ndarray, P: np.ndarray,
                         sample: pd.DataFrame | None) -> pd.DataFrame:
        """The submission in the sample's id order and column order."""
        out = pd.DataFrame(P.astype(np.float64), columns=self.label_names)
        out.insert(0, self.cfg.id_column, ids)
        if sample is None:
            return out
        if set(sample.columns) != {self.cfg.id_column, *self.label_names}:
            raise HybridstackError(
                f"sample submission columns {list(sample.columns)} are not the id column "
                f"'{self.cfg.id_column}' and {self.label_names}; use the competition's sample"
            )
        out = out.set_index(self.cfg.id_column).loc[sample[self.cfg.id_column].astype(str)]
        out = out.reset_index()
        return out[list(sample.columns)]

    def validate_submission(self, sub: pd.DataFrame, sample: pd.DataFrame | None,
                            test_ids: np.ndarray) -> None:
        """Refuse missing/extra ids, NaN, values outside [0, 1], pairwise rows not summing to 1."""
        id_col = self.cfg.id_column
        expected = sample[id_col].astype(str) if sample is not None else pd.Series(test_ids)
        got = sub[id_col].astype(str)
        missing = set(expected) - set(got)
        extra = set(got) - set(expected)
        if missing or extra or len(got) != len(expected):
            raise HybridstackError(
                f"submission ids do not match: {len(missing)} missing, {len(extra)} extra, "
                f"{len(got)} rows for {len(expected)} expected ids"
            )
        values = sub.drop(columns=[id_col])
        numeric = values.select_dtypes("number")
        if numeric.isna().any().any():
            raise HybridstackError("submission has NaN probabilities")
        if ((numeric < 0) | (numeric > 1)).any().any():
            raise HybridstackError("submission has probabilities outside [0, 1]")
        if self.kind == "pairwise":
            row_sums = numeric[self.label_names].sum(axis=1)
            if not np.allclose(row_sums, 1.0, atol=1e-4):
                raise HybridstackError("pairwise submission rows must sum to 1")


class PairwiseTask(Task):
    """LMSYS / "LLM Classification Finetuning": which of two responses wins, or a tie."""

    kind = "pairwise"
    metric_name = "log_loss"
    greater_is_better = False
    swap_fields = ("response_a", "response_b")
    swap_permutation = [1, 0, 2]

    @property
    def label_names(self) -> list[str]:
        return list(self.cfg.winner_columns)

    @property
    def field_names(self) -> list[str]:
        return ["prompt", "response_a", "response_b"]

    def text_columns(self) -> list[str]:
        return [self.cfg.prompt_column, *self.cfg.response_columns]

    def label_columns(self) -> list[str]:
        return list(self.cfg.winner_columns)

    def render_fields(self, frame: pd.DataFrame, source: str) -> dict[str, list[str]]:
        ids = frame[self.cfg.id_column].astype(str).tolist()
        columns = self.text_columns()
        fields, self._turns = {}, {}
        for name, col in zip(self.field_names, columns):
            turns: list[tuple[str, ...] | None] = []
            fields[name] = self._clean(_join_turns(frame[col].tolist(), ids, col, source,
                                                   self._odd_text, turns))
            self._turns[name] = [None if t is None else tuple(
                clean_text(replace_lone_surrogates(x)[0], self.clean) for x in t) for t in turns]
        return fields

    def parse_target(self, frame: pd.DataFrame, ids: np.ndarray, source: str) -> np.ndarray:
        Y = _parse_binary_matrix(frame, self.label_columns(), ids, source)
        not_one_hot = np.flatnonzero(Y.sum(axis=1) != 1)
        if len(not_one_hot):
            raise HybridstackError(
                f"{source}: {len(not_one_hot)} rows have winner columns that are not one-hot "
                f"(exactly one of {', '.join(self.label_columns())} must be 1; "
                f"first id {ids[not_one_hot[0]]})"
            )
        return Y

    def groups(self, fields: dict[str, list[str]]) -> np.ndarray:
        return np.asarray(fields["prompt"], dtype=object)

    def score(self, Y: np.ndarray, P: np.ndarray) -> float:
        return multiclass_log_loss(Y, P)

    def metrics(self, Y: np.ndarray, P: np.ndarray) -> dict[str, float]:
        return {"metric": self.score(Y, P),
                "accuracy": float(accuracy_score(Y.argmax(1), P.argmax(1)))}


class MultilabelTask(Task):
    """Jigsaw toxic comments: K independent 0/1 labels, mean column-wise ROC-AUC."""

    kind = "multilabel"
    metric_name = "mean_roc_auc"
    greater_is_better = True

    @property
    def label_names(self) -> list[str]:
        return list(self.cfg.label_columns)

    def text_columns(self) -> list[str]:
        return list(self.cfg.text_columns)

    def label_columns(self) -> list[str]:
        return list(self.cfg.label_columns)

    def render_fields(self, frame: pd.DataFrame, source: str) -> dict[str, list[str]]:
        return {"text": self._clean(_join_columns(frame, self.text_columns()))}

    def parse_target(self, frame: pd.DataFrame, ids: np.ndarray, source: str) -> np.ndarray:
        return _parse_binary_matrix(frame, self.label_columns(), ids, source)

    def stratify_target(self, Y: np.ndarray) -> np.ndarray:
        return Y

    def score(self, Y: np.ndarray, P: np.ndarray) -> float:
        return mean_column_auc(Y, P)

    def metrics(self, Y: np.ndarray, P: np.ndarray) -> dict[str, float]:
        out = {"metric": self.score(Y, P)}
        for j, name in enumerate(self.label_names):
            out[f"auc_{name}"] = _safe_auc(Y[:, j], P[:, j])
        return out


class MulticlassTask(Task):
    """Any CSV with text column(s) and one label column of any dtype (binary included)."""

    kind = "multiclass"
    metric_name = "log_loss"
    greater_is_better = False

    def __init__(self, cfg: TaskConfig, clean: CleanConfig, classes: list[str] | None = None):
        super().__init__(cfg, clean)
        self.classes = classes  # learnt from the train labels on first parse

    @property
    def label_names(self) -> list[str]:
        if self.classes is None:
            raise RuntimeError("multiclass task: classes are known only after parsing train")
        return list(self.classes)

    def text_columns(self) -> list[str]:
        return list(self.cfg.text_columns)

    def label_columns(self) -> list[str]:
        return [self.cfg.label_column]

    def render_fields(self, frame: pd.DataFrame, source: str) -> dict[str, list[str]]:
        return {"text": self._clean(_join_columns(frame, self.text_columns()))}

    def parse_target(self, frame: pd.DataFrame, ids: np.ndarray, source: str) -> np.ndarray:
        labels = frame[self.cfg.label_column].astype(str).str.strip()
        if (labels == "").any():
            first = ids[np.flatnonzero((labels == "").to_numpy())[0]]
            raise HybridstackError(
                f"{source}: {int((labels == '').sum())} rows have an empty label in "
                f"'{self.cfg.label_column}' (first id {first}); drop or label them"
            )
        if self.classes is None:
            self.classes = sorted(labels.unique(), key=_natural_key)
            if len(self.classes) < 2:
                raise HybridstackError(
                    f"{source}: label column '{self.cfg.label_column}' has a single class "
                    f"{self.classes}; a classifier needs at least two"
                )
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise HybridstackError(
                f"{source}: labels outside the class set {self.classes}: {unknown[:5]}"
            )
        codes = labels.map(index).to_numpy()
        return np.eye(len(self.classes), dtype=np.float32)[codes]

    def positive_label(self, column: str) -> str:
        """Binary: the class a one-column submission gives the probability of.

        ``task.positive_label`` when set; else the class the column is named after
        (``target`` of classes ``other``/``target``); else the 1 / true / yes of the pair.
        """
        classes = self.label_names
        if self.cfg.positive_label is not None:
            if self.cfg.positive_label not in classes:
                raise HybridstackError(f"task.positive_label = {self.cfg.positive_label!r} is not "
                                       f"one of the classes {classes}")
            return self.cfg.positive_label
        named = [c for c in classes if c.lower() == column.lower()]
        if len(named) == 1:
            return named[0]
        for negative, positive in _BINARY_PAIRS:
            lowered = {c.lower(): c for c in classes}
            if set(lowered) == {negative, positive}:
                return lowered[positive]
        raise HybridstackError(
            f"the sample submission's one column {column!r} does not say which of the classes "
            f"{classes} it holds the probability of; set task.positive_label to one of them")

    def score(self, Y: np.ndarray, P: np.ndarray) -> float:
        return multiclass_log_loss(Y, P)

    def metrics(self, Y: np.ndarray, P: np.ndarray) -> dict[str, float]:
        y, pred = Y.argmax(1), P.argmax(1)
        out = {"metric": self.score(Y, P),
               "accuracy": float(accuracy_score(y, pred)),
               "macro_f1": float(f1_score(y, pred, average="macro"))}
        if self.n_classes == 2:
            out["roc_auc"] = _safe_auc(Y[:, 1], P[:, 1])
        return out

    def submission_frame(self, ids: np.ndarray, P: np.ndarray,
                         sample: pd.DataFrame | None) -> pd.DataFrame:
        value_columns = [] if sample is None else [c for c in sample.columns if c != self.cfg.id_column]
        if sample is None or set(value_columns) == set(self.label_names):
            return super().submission_frame(ids, P, sample)
        if len(value_columns) != 1:
            raise HybridstackError(
                f"sample submission columns {value_columns} are neither the class names "
                f"{self.label_names} nor a single label column"
            )
        # One target column: binary competitions score the positive-class probability,
        # multi-class ones expect the predicted label.
        column = value_columns[0]
        if self.n_classes == 2:
            values = P[:, self.label_names.index(self.positive_label(column))]
        else:
            values = np.asarray(self.label_names)[P.argmax(1)]
        out = pd.DataFrame({self.cfg.id_column: ids, column: values})
        out = out.set_index(self.cfg.id_column).loc[sample[self.cfg.id_column].astype(str)]
        return out.reset_index()[list(sample.columns)]


# (negative, positive) label pairs whose positive class is clear without being told
_BINARY_PAIRS = (("0", "1"), ("false", "true"), ("no", "yes"), ("0.0", "1.0"), ("neg", "pos"),
                 ("negative", "positive"))


# -- construction ------------------------------------------------------------------------

TASK_KINDS: dict[str, type[Task]] = {
    "pairwise": PairwiseTask,
    "multilabel": MultilabelTask,
    "multiclass": MulticlassTask,
}


def make_task(cfg: Config, classes: list[str] | None = None) -> Task:
    cls = TASK_KINDS[cfg.task.kind]
    if cls is MulticlassTask:
        return MulticlassTask(cfg.task, cfg.data.clean, classes=classes)
    return cls(cfg.task, cfg.data.clean)


# -- metrics -----------------------------------------------------------------------------


def multiclass_log_loss(Y: np.ndarray, P: np.ndarray) -> float:
    """Log loss exactly as Kaggle's scorer (sklearn's ``log_loss``) computes it on a submission
    read from CSV: the probabilities as float64, sklearn's own clipping and row normalisation
    (float32 rows sum to 1 only within float32 rounding, hence no warning about it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one")
        return float(log_loss(Y.argmax(axis=1), np.asarray(P, dtype=np.float64),
                              labels=list(range(P.shape[1]))))


def _safe_auc(y: np.ndarray, p: np.ndarray) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def mean_column_auc(Y: np.ndarray, P: np.ndarray) -> float:
    """Mean ROC-AUC over the labels that have both classes (Kaggle's Jigsaw metric)."""
    aucs = [_safe_auc(Y[:, j], P[:, j]) for j in range(Y.shape[1])]
    valid = [a for a in aucs if not np.isnan(a)]
    if not valid:
        raise HybridstackError("no label has both classes: ROC-AUC is undefined")
    return float(np.mean(valid))


# -- parsing helpers ---------------------------------------------------------------------


def _check_unique_ids(ids: np.ndarray, source: str, column: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    dup = uniq[counts > 1]
    if len(dup):
        raise HybridstackError(
            f"{source}: {len(dup)} duplicate ids in column '{column}' (e.g. {dup[0]!r}); "
            "ids must be unique"
        )


def _join_columns(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    if len(columns) == 1:
        return frame[columns[0]].tolist()
    return ["\n".join(parts) for parts in zip(*(frame[c].tolist() for c in columns))]


# What Task.parse normalises, as the log says it (the keys are also Dataset.stats keys).
ODD_TEXT_NOTES = {
    "lone_surrogates": "lone UTF-16 surrogates replaced by U+FFFD",
    "turns_null": "null turns read as empty turns",
    "turns_bool": "true/false turns read as the text 'true'/'false'",
    "turns_number": "number turns read as their decimal text",
    "turns_nested": "list/object turns read as their JSON text",
}


def _turn_text(turn: object, counts: Counter[str]) -> str:
    """One LMSYS turn as text; anything but a string is normalised and counted."""
    if isinstance(turn, str):
        return turn
    if turn is None:
        counts["turns_null"] += 1
        return ""
    if isinstance(turn, bool):  # before numbers: bool is an int subclass
        counts["turns_bool"] += 1
        return "true" if turn else "false"
    if isinstance(turn, (int, float)):
        counts["turns_number"] += 1
        return str(turn)
    counts["turns_nested"] += 1
    return json.dumps(turn, ensure_ascii=False)


def _join_turns(values: list[str], ids: list[str], column: str, source: str,
                counts: Counter[str], turns_out: list | None = None) -> list[str]:
    """Parse LMSYS JSON lists of turns and join them turn by turn (see :func:`_turn_text`).

    ``turns_out`` (when given) receives each row's turn texts (None for a single turn).
    """
    out = []
    for row_id, value in zip(ids, values):
        if value.strip() == "":
            out.append("")
            if turns_out is not None:
                turns_out.append(None)
            continue
        try:
            turns = json.loads(value)
        except json.JSONDecodeError as err:
            raise HybridstackError(
                f"{source}: id {row_id}: '{column}' is not valid JSON ({err.msg} at char "
                f"{err.pos}); it must be a JSON list of turns such as [\"hi\", null]"
            ) from None
        if isinstance(turns, str):
            turns = [turns]
        if not isinstance(turns, list):
            raise HybridstackError(
                f"{source}: id {row_id}: '{column}' must be a JSON list of turns, "
                f"got {type(turns).__name__}"
            )
        texts = [_turn_text(t, counts) for t in turns]
        out.append("\n\n".join(texts))
        if turns_out is not None:
            turns_out.append(tuple(texts) if len(texts) > 1 else None)
    return out


def _parse_binary_matrix(frame: pd.DataFrame, columns: list[str], ids: np.ndarray,
                         source: str) -> np.ndarray:
    Y = np.zeros((len(frame), len(columns)), dtype=np.float32)
    for j, col in enumerate(columns):
        values = pd.to_numeric(frame[col].str.strip(), errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            raise HybridstackError(
                f"{source}: column '{col}' must hold 0 or 1; {int(bad.sum())} rows do not "
                f"(first: id {ids[first]} = {frame[col].iloc[first]!r})"
            )
        Y[:, j] = values.to_numpy(dtype=np.float32)
    return Y


def _count_empty(fields: dict[str, list[str]]) -> int:
    """Rows where every text field is empty after cleaning."""
    columns = list(fields.values())
    return sum(1 for parts in zip(*columns) if not any(p.strip() for p in parts))


def _natural_key(label: str) -> tuple:
    """Sort numeric labels numerically ("2" < "10"), others as text."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)
