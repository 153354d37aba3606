"""Scoring new rows with a finished experiment: every base model the stacker uses, then the stacker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

from hybridstack.ensembles.inputs import meta_features
from hybridstack.ensembles.levels import predict_levels
from hybridstack.ensembles.thresholds import apply_thresholds
from hybridstack.errors import HybridstackError
from hybridstack.predict import explain
from hybridstack.predict.families import BaseModel, EmbedModel, TfidfModel, load_base_models
from hybridstack.predict.source import Rows, RunContext, open_run, parse_rows
from hybridstack.runs import META_MODEL_FILE, THRESHOLDS_FILE, WEIGHTS_FILE, read_json
from hybridstack.tasks import Dataset


class Predictor:
    """A finished experiment, ready to score rows in the task's own column format.

    Build it with :func:`load`. ``rows`` is a DataFrame, one dict or a list of dicts with
    the text columns the experiment was trained on (pairwise: prompt/response_a/response_b
    as JSON lists of turns, or Python lists); an id column is optional (row numbers are
    used). Every method also accepts a parsed :class:`~hybridstack.tasks.Dataset`.

    Attributes
    ----------
    label_names : the C probability columns. multilabel : True for independent labels.
    base_models : the base-model predictors the stacker blends, in its column order.
    thresholds : multilabel only: ``stack/thresholds.json`` (per-label decision thresholds).
    """

    def __init__(self, ctx: RunContext, stack_model: dict[str, Any], base_models: list[BaseModel]):
        self.ctx = ctx
        self.task = ctx.task
        self.label_names = ctx.task.label_names
        self.multilabel = ctx.task.kind == "multilabel"
        self.stack_model = stack_model
        self.stacker = stack_model["stacker"]
        self.model_names = stack_model["models"]  # as the stack names them (sibling/<model>)
        self.use_meta_features = stack_model["meta_features"]
        self.base_models = base_models
        stack = ctx.dir.stack
        self.weights = read_json(stack.path / WEIGHTS_FILE)
        self.thresholds = read_json(stack.path / THRESHOLDS_FILE) if self.multilabel else None
        self._ngram_names: dict[str, explain.NgramNames] = {}

    # -- parsing -------------------------------------------------------------------------------
    def parse(self, rows: Rows | Dataset, source: str = "rows", first_row: int = 0) -> Dataset:
        """Validate and parse ``rows`` (see the class docstring); a Dataset passes through."""
        if isinstance(rows, Dataset):
            return rows
        return parse_rows(self.task, rows, source, first_row)

    # -- prediction ----------------------------------------------------------------------------
    def predict_base(self, rows: Rows | Dataset) -> dict[str, np.ndarray]:
        """Each base model's (n, C) float32 probabilities, keyed by model name."""
        return self._base_outputs(self.parse(rows))[0]

    def _base_outputs(self, ds: Dataset) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Base-model predictions and the features they were made from (keyed by featurizer).

        Models sharing features (the heads of one embedding encoder) compute them once.
        """
        features: dict[str, Any] = {}
        preds = {}
        for model in self.base_models:
            key = model.featurizer.key
            if key not in features:
                features[key] = model.featurizer.transform(ds)
            preds[model.name] = model.predict(features[key])
        return preds, features

    def predict_proba(self, rows: Rows | Dataset) -> np.ndarray:
        """(n, C) float32 probabilities of the stacker (what submission.csv holds)."""
        ds = self.parse(rows)
        return self.stack(ds, self._base_outputs(ds)[0])

    def stack(self, ds: Dataset, base_preds: dict[str, np.ndarray]) -> np.ndarray:
        """The stacker on base-model predictions, built like ``stages.stack.build_inputs``."""
        by_stack_name = {name: base_preds[model.name]
                         for name, model in zip(self.model_names, self.base_models)}
        meta = meta_features(ds.fields) if self.use_meta_features else None
        return predict_levels(self.stack_model, by_stack_name, meta)

    def labels_from_proba(self, P: np.ndarray) -> np.ndarray:
        """Multilabel: (n, K) int8 0/1 with the tuned thresholds; else (n,) class names (argmax)."""
        if self.multilabel:
            return apply_thresholds(P, self.thresholds, self.label_names)
        return np.asarray(self.label_names, dtype=object)[P.argmax(axis=1)]

    def predict(self, rows: Rows | Dataset) -> np.ndarray:
        """Labels of ``rows``: see :meth:`labels_from_proba`."""
        return self.labels_from_proba(self.predict_proba(rows))

    def predict_frame(self, rows: Rows | Dataset, source: str = "rows",
                      first_row: int = 0) -> pd.DataFrame:
        """id, one probability column per label, then ``pred_<label>`` 0/1 columns (multilabel)
        or one ``pred_label`` column (the argmax class)."""
        ds = self.parse(rows, source, first_row)
        P = self.predict_proba(ds)
        frame = pd.DataFrame(P, columns=self.label_names)
        frame.insert(0, self.task.cfg.id_column, ds.ids)
        labels = self.labels_from_proba(P)
        if self.multilabel:
            for j, name in enumerate(self.label_names):
                frame[f"pred_{name}"] = labels[:, j]
        else:
            frame["pred_label"] = labels
        return frame

    # -- explanations --------------------------------------------------------------------------
    def explain(self, rows: Rows | Dataset, top_k: int = 8) -> list[dict[str, Any]]:
        """Per row: probabilities, predicted labels, and why (see :mod:`hybridstack.predict.explain`).

        Returns
        -------
        One dict per row: ``id``, ``probabilities`` {label: p}, ``labels`` (predicted label
        names), ``stack`` (method and each base model's share), and ``models``:
        {model name: {label: [...]}} for the predicted labels, with TF-IDF n-grams
        (ngram, analyzer, field, contribution) and LightGBM feature contributions
        (feature, contribution in log-odds).
        """
        ds = self.parse(rows)
        base_preds, features = self._base_outputs(ds)
        P = self.stack(ds, base_preds)
        wanted = self._explained_labels(self.labels_from_proba(P))
        shares = explain.stack_shares(self.weights)
        per_model = {model.name: self._explain_model(model, features[model.featurizer.key],
                                                     wanted, top_k)
                     for model in self.base_models if self._explainable(model)}
        return [{
            "id": str(ds.ids[i]),
            "probabilities": dict(zip(self.label_names, map(float, P[i]))),
            "labels": [self.label_names[j] for j in wanted[i]],
            "stack": shares,
            "models": {name: per_row[i] for name, per_row in per_model.items()},
        } for i in range(len(ds))]

    def _explained_labels(self, labels: np.ndarray) -> list[list[int]]:
        """Column indices of each row's predicted labels."""
        if self.multilabel:
            return [list(np.flatnonzero(row)) for row in labels]
        index = {name: j for j, name in enumerate(self.label_names)}
        return [[index[name]] for name in labels]

    @staticmethod
    def _explainable(model: BaseModel) -> bool:
        return isinstance(model, TfidfModel) or (
            isinstance(model, EmbedModel) and model.head_kind == "LGBMHead")

    def _explain_model(self, model: TfidfModel | EmbedModel, features: Any,
                       wanted: list[list[int]], top_k: int) -> list[dict[str, list[dict]]]:
        """Per row {label name: entries} for that row's predicted labels, one call per label."""
        per_row: list[dict[str, list[dict]]] = [{} for _ in wanted]
        for j in sorted({j for row in wanted for j in row}):
            rows = [i for i, row in enumerate(wanted) if j in row]
            if isinstance(model, TfidfModel):
                entries = explain.ngram_contributions(model.heads, features[0][rows], j,
                                                      self._ngram_names_of(model), top_k)
            else:
                groups = explain.tree_feature_groups(model.blocks, self.label_names)
                entries = explain.tree_contributions(model.heads, features.X[rows], j,
                                                     len(self.label_names), groups, top_k)
            for i, row_entries in zip(rows, entries):
                per_row[i][self.label_names[j]] = row_entries
        return per_row

    def _ngram_names_of(self, model: TfidfModel) -> explain.NgramNames:
        """Column names of a TF-IDF model (built once: the vocabulary is large)."""
        if model.name not in self._ngram_names:
            fields = explain.tfidf_block_fields(self.task.field_names, self.task.swap_fields)
            self._ngram_names[model.name] = explain.NgramNames(model.featurizer.vectorizer, fields)
        return self._ngram_names[model.name]


def load(experiment_dir: str | Path, cache_dir: str | Path | None = None) -> Predictor:
    """Open ``runs/<experiment>/`` for prediction; nothing is written there or in its workdir.

    Parameters
    ----------
    experiment_dir : an experiment folder with a finished stack (it may be read-only, and
        its train file may be gone).
    cache_dir : where embeddings of texts the training run did not cache are written
        (default: a temporary folder removed with the predictor); the run's own cache is
        read through it.

    Returns
    -------
    Predictor with ``predict_proba(rows)`` (n, C), ``predict(rows)``, ``explain(rows)``.
    """
    ctx = open_run(experiment_dir, cache_dir)
    stack = ctx.dir.stack
    meta_path = stack.path / META_MODEL_FILE
    if not stack.is_done() or not meta_path.is_file():
        raise HybridstackError(
            f"{ctx.dir.path.name} has no finished stack ({meta_path} missing); run "
            f"`hybridstack run stack -c {ctx.rerun_hint}` first")
    stack_model = joblib.load(meta_path)
    check_base_models_unchanged(ctx, stack_model["models"])
    return Predictor(ctx, stack_model, load_base_models(ctx, stack_model["models"]))


def check_base_models_unchanged(ctx: RunContext, names: list[str]) -> None:
    """Refuse base models that are missing or were refitted after the stack was fitted."""
    fitted_on = read_json(ctx.dir.stack.config_path)["settings"]["base_models"]
    for name in names:
        model = ctx.dir.model(name)
        if not model.is_done():
            raise HybridstackError(
                f"models/{name} (used by the stack) is missing or unfinished; re-run its stage "
                f"and the stack with `hybridstack run all -c {ctx.rerun_hint}`")
        if not model.is_done(fitted_on[name]):
            raise HybridstackError(
                f"models/{name} was refitted after the stack was fitted; re-run "
                f"`hybridstack run stack -c {ctx.rerun_hint}`")
