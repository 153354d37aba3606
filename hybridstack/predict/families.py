"""Predictors of each base-model family, rebuilt from a finished model folder.

Each one reproduces its stage's test-time path exactly: the same features (through the
same functions the stage used), every trained fold model, swap test-time averaging per
the saved settings, and the fold average of :func:`~hybridstack.heads.base.fit_oof`
(float64 sum over folds / n_folds, then float32). A family splits prediction into
``featurizer.transform(ds)`` and ``predict(features)``, so models that share features
(every head of one embedding encoder) compute them once per batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from accelerate import Accelerator

from hybridstack.errors import HybridstackError
from hybridstack.features.embed_matrix import (
    encode_fields,
    exclusion_groups,
    group_keys,
    split_views,
)
from hybridstack.features.embeddings import EmbeddingCache
from hybridstack.features.knn import GROUP_MAP_FILE, GroupMap
from hybridstack.features.tfidf import TfidfFeaturizer
from hybridstack.finetune import lora
from hybridstack.finetune.data import EncodedRows, make_renderer
from hybridstack.finetune.loop import predict_views as predict_token_views
from hybridstack.finetune.model import load_tokenizer, load_trained, resolve_mixed_precision
from hybridstack.heads.base import predict_views
from hybridstack.predict.source import RunContext
from hybridstack.runs import FEATURIZER_FILE, FOLD_MODEL_FILE, ModelDir, read_json
from hybridstack.tasks import Dataset


def fold_average(preds: Iterable[np.ndarray]) -> np.ndarray:
    """(n, C) float32 mean of the fold models' predictions, summed in float64 like fit_oof."""
    total, n_folds = None, 0
    for pred in preds:
        total = pred.astype(np.float64) if total is None else total + pred
        n_folds += 1
    return (total / n_folds).astype(np.float32)


def trained_folds(model: ModelDir) -> list[int]:
    """The folds a model was trained on (its test predictions average exactly these)."""
    folds = sorted(int(k) for k in model.load_scores()["per_fold"])
    if not folds:
        raise HybridstackError(f"models/{model.name}/scores.json names no trained fold; re-run its stage")
    return folds


def required_file(path: Path, model: ModelDir, hint: str) -> Path:
    if not path.exists():
        raise HybridstackError(
            f"models/{model.name}: {path.relative_to(model.path)} is missing; {hint}")
    return path


def load_fold_heads(model: ModelDir, hint: str) -> list[Any]:
    """The fitted head of every trained fold (``fold_<k>/model.joblib``)."""
    return [joblib.load(required_file(model.fold_dir(k) / FOLD_MODEL_FILE, model, hint))
            for k in trained_folds(model)]


# -- models with a saved featurizer (tfidf, and any stage that saves one) -----------------------


class SavedFeaturizer:
    """A model folder's ``featurizer.joblib``: parsed rows -> (X, X_swap)."""

    def __init__(self, model: ModelDir, featurizer: Any):
        self.key = f"featurizer:{model.name}"
        self.featurizer = featurizer

    @property
    def vectorizer(self) -> Any:  # TF-IDF models: for n-gram explanations
        return self.featurizer.vectorizer

    def transform(self, ds: Dataset) -> tuple[Any, Any | None]:
        return self.featurizer.transform(ds)


class FeaturizedModel:
    """A base model whose folder holds its featurizer and a joblib head per trained fold:
    predicted with no code of the stage that made it."""

    def __init__(self, model: ModelDir, config: dict[str, Any], ctx: RunContext,
                 featurizer: Any | None = None):
        hint = f"re-run its stage (`hybridstack run {config.get('stage')} -c {ctx.rerun_hint}`)"
        self.name = model.name
        if featurizer is None:
            featurizer = joblib.load(required_file(model.path / FEATURIZER_FILE, model, hint))
        self.featurizer = SavedFeaturizer(model, featurizer)
        self.heads = load_fold_heads(model, hint)
        settings = config["settings"]
        tta = settings.get("swap_tta", settings.get("tfidf", {}).get("swap_tta", True))
        self.permutation = ctx.task.swap_permutation if tta else None

    def predict(self, views: tuple[Any, Any | None]) -> np.ndarray:
        """(n, C) float32 probabilities, mean over the fold models."""
        X, X_swap = views
        swapped = X_swap if self.permutation is not None else None
        return fold_average(predict_views(head, X, swapped, self.permutation)
                            for head in self.heads)


class TfidfModel(FeaturizedModel):
    """A tfidf-stage logistic regression: explained by its n-grams."""


def old_tfidf_featurizer(model: ModelDir, ctx: RunContext) -> TfidfFeaturizer:
    """A run made before featurizer.joblib existed kept only its ``vectorizer.joblib``."""
    hint = f"re-run `hybridstack run tfidf -c {ctx.rerun_hint}`"
    vectorizer = joblib.load(required_file(model.path / "vectorizer.joblib", model, hint))
    return TfidfFeaturizer(vectorizer, ctx.task.swap_fields)


# -- embed -------------------------------------------------------------------------------------


@dataclass
class EmbedInputs:
    X: np.ndarray  # (n, d) float32, kNN group column last when kNN is on
    X_swap: np.ndarray | None
    blocks: list[tuple[str, int]]


class EmbedFeaturizer:
    """Cached sentence embeddings -> the embed stage's feature matrix for new rows.

    Only texts missing from the embedding cache (and its read-only layers) are encoded.
    The kNN exclusion groups come from the model folder's ``knn_groups.npz``; a run made
    before it existed rebuilds them from train.csv.
    """

    def __init__(self, model: ModelDir, settings: dict[str, Any], ctx: RunContext,
                 cache: EmbeddingCache):
        self.cache = cache
        self.ctx = ctx
        self.length_features = settings["embed"]["length_features"]
        self.knn = settings["embed"]["knn"]
        self.key = featurizer_key(cache.key, self.length_features, self.knn)
        map_path = model.path / GROUP_MAP_FILE
        self.group_map = GroupMap.load(map_path) if self.knn and map_path.is_file() else None

    def transform(self, ds: Dataset) -> EmbedInputs:
        task = self.ctx.task
        emb = encode_fields(self.cache, task, [ds])[0]
        X, X_swap, blocks, _ = split_views(task, ds, emb, self.length_features)
        if self.knn:
            group = self._groups(ds)[:, None]
            X = np.hstack([X, group])
            X_swap = None if X_swap is None else np.hstack([X_swap, group])
            blocks = [*blocks, ("knn_group", 1)]
        return EmbedInputs(X, X_swap, blocks)


    def _groups(self, ds: Dataset) -> np.ndarray:
        """(n,) float32 kNN exclusion group of each new row (a train row's group, or unseen)."""
        if self.group_map is not None:
            return self.group_map.lookup(group_keys(self.ctx.task, ds))
        # numbered over [train, new] exactly as over [train, test] at training time
        return exclusion_groups(self.ctx.task, [self.ctx.train, ds])[1]


def featurizer_key(encoder_key: str, length_features: bool, knn: bool) -> str:
    return f"embed:{encoder_key}:{length_features}:{knn}"


def embedding_cache(settings: dict[str, Any], ctx: RunContext) -> EmbeddingCache:
    """The EmbeddingCache with the encoder settings the heads were trained with.

    The training run's cache (the workdir's, or the stage's explicit embed.cache_dir) is
    only read; texts it lacks are encoded into ``ctx.cache_dir``.
    """
    embed = settings["embed"]
    trained = (Path(embed["cache_dir"]) if embed.get("cache_dir")
               else ctx.dir.path.parent.parent / "cache" / "embeddings")
    return EmbeddingCache(ctx.cache_dir, embed["model"], max_seq_length=embed["max_seq_length"],
                          prefix=embed["prefix"], normalize=embed["normalize"],
                          dtype=embed["dtype"], batch_size=embed["batch_size"],
                          read_only_roots=[trained])


class EmbedModel:
    """An embed-stage head (LightGBM or MLP, kNN-wrapped or not) per trained fold."""

    def __init__(self, model: ModelDir, config: dict[str, Any], ctx: RunContext,
                 featurizer: EmbedFeaturizer):
        settings = config["settings"]
        hint = f"re-run `hybridstack run embed -c {ctx.rerun_hint}`"
        if featurizer.cache.key != settings["encoder_key"]:
            raise HybridstackError(
                f"models/{model.name} was trained on encoder {settings['encoder_key']} but "
                f"embed.model now gives {featurizer.cache.key} (model files changed); {hint}")
        self.name = model.name
        self.featurizer = featurizer
        self.head_kind = settings["head"]  # "LGBMHead" or "MLPHead"
        self.blocks = [tuple(b) for b in settings["feature_blocks"]]
        self.heads = load_fold_heads(model, hint)
        tta = settings["embed"]["swap_tta"]
        self.permutation = ctx.task.swap_permutation if tta else None
        self.hint = hint

    def predict(self, inputs: EmbedInputs) -> np.ndarray:
        """(n, C) float32 probabilities, mean over the fold models."""
        if [tuple(b) for b in inputs.blocks] != self.blocks:
            raise HybridstackError(
                f"models/{self.name}: feature layout {inputs.blocks} differs from the trained "
                f"{self.blocks}; {self.hint}")
        swapped = inputs.X_swap if self.permutation is not None else None
        return fold_average(predict_views(head, inputs.X, swapped, self.permutation)
                            for head in self.heads)


# -- finetune ----------------------------------------------------------------------------------


class FinetuneFeaturizer:
    """Token ids rendered like ``stages.finetune.encode_experiment`` (budgets, head+tail cuts)."""

    def __init__(self, model: ModelDir, settings: dict[str, Any], ctx: RunContext, tokenizer):
        task = ctx.task
        shares = tuple(settings["segment_budget"]) if len(task.field_names) > 1 else (1.0,)
        self.renderer = make_renderer(tokenizer, task.field_names, shares, settings["max_length"],
                                      settings["head_fraction"], is_decoder_run(settings))
        wants_swap = settings["swap_augment"] or settings["swap_tta"]
        self.swap = task.swap_fields if wants_swap else None
        self.key = f"finetune:{model.name}"

    def transform(self, ds: Dataset) -> list[list[list[int]]]:
        """[ids] or [ids, swapped ids]: n token-id lists per view."""
        ids, swapped = self.renderer.render(ds.fields, self.swap, ds.turns)
        return [ids] if swapped is None else [ids, swapped]


def is_decoder_run(settings: dict[str, Any]) -> bool:
    return settings.get("backbone") == "decoder"  # runs before decoders existed: encoders


class FinetuneModel:
    """A fine-tuned transformer: the best checkpoint (``fold_<k>/best/``) of every trained fold.

    A LoRA model (``method = "lora"``) loads its base once, found by the recorded id through
    the model lookup (or ``predict --base-model``) and checked against the recorded
    fingerprint, with every fold's adapters; ``predict --quantization 4bit`` loads the base
    in 4-bit (a 9B model on a T4).
    """

    def __init__(self, model: ModelDir, config: dict[str, Any], ctx: RunContext):
        settings = config["settings"]
        hint = f"re-run `hybridstack run finetune -c {ctx.rerun_hint}`"
        best_dirs = [required_file(model.fold_dir(k) / "best", model, hint)
                     for k in trained_folds(model)]
        self.name = model.name
        tokenizer = load_tokenizer(best_dirs[0], key=f"models/{model.name}")
        if is_decoder_run(settings):
            lora.prepare_tokenizer(tokenizer)
        self.featurizer = FinetuneFeaturizer(model, settings, ctx, tokenizer)
        self.tokenizer = tokenizer
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(settings["mixed_precision"]))
        self.adapter_names: list[str] | None = None
        if settings.get("method", "full") == "lora":
            where = f"models/{model.name}"
            base_id = read_json(required_file(best_dirs[0] / lora.BASE_FILE, model, hint))["model"]
            base_path = lora.find_base(base_id, where)
            quantization = (os.environ.get(lora.QUANTIZATION_ENV, "").strip()
                            or settings.get("quantization"))
            merged, self.adapter_names = lora.load_adapter_models(
                best_dirs, base_path, quantization or None, where, self.accelerator.device)
            self.models = [merged]
        else:
            self.models = [load_trained(d).to(self.accelerator.device) for d in best_dirs]
        tta = settings["swap_tta"] and ctx.task.swap_fields is not None
        self.permutation = ctx.task.swap_permutation if tta else None
        self.batch_size = settings["eval_batch_size"]
        self.multilabel = ctx.task.kind == "multilabel"

    def predict(self, views: list[list[list[int]]]) -> np.ndarray:
        """(n, C) float32 probabilities, mean over the fold checkpoints."""
        rows = [EncodedRows(ids) for ids in views]
        if self.permutation is None:
            rows = rows[:1]
        return fold_average(
            predict_token_views(self.accelerator, model, rows, self.permutation, self.tokenizer,
                                self.batch_size, self.multilabel)
            for model in self._fold_models())

    def _fold_models(self) -> Iterable[Any]:
        """Each fold's model; LoRA folds are one base with the fold's adapters switched in."""
        if self.adapter_names is None:
            yield from self.models
            return
        for name in self.adapter_names:
            self.models[0].set_adapter(name)
            yield self.models[0]


# -- loading -----------------------------------------------------------------------------------


def load_base_models(ctx: RunContext, names: list[str]) -> list[TfidfModel | EmbedModel | FinetuneModel]:
    """The predictor of every named base model, in order; embed heads of one encoder share features."""
    featurizers: dict[str, EmbedFeaturizer] = {}
    models = []
    for name in names:
        model = ctx.dir.model(name)
        config = read_json(required_file(model.config_path, model, "re-run its stage"))
        stage = config.get("stage")
        if stage == "tfidf":
            saved = None if (model.path / FEATURIZER_FILE).is_file() else old_tfidf_featurizer(model, ctx)
            models.append(TfidfModel(model, config, ctx, saved))
        elif (model.path / FEATURIZER_FILE).is_file():
            models.append(FeaturizedModel(model, config, ctx))
        elif stage == "embed":
            settings = config["settings"]
            key = featurizer_key(settings["encoder_key"], settings["embed"]["length_features"],
                                 settings["embed"]["knn"])
            if key not in featurizers:
                featurizers[key] = EmbedFeaturizer(model, settings, ctx,
                                                   embedding_cache(settings, ctx))
            models.append(EmbedModel(model, config, ctx, featurizers[key]))
        elif stage == "finetune":
            models.append(FinetuneModel(model, config, ctx))
        else:
            raise HybridstackError(
                f"models/{name}/config.json names no known stage ({stage!r}); it was written "
                "by an older hybridstack: re-run its stage and the stack")
    return models

