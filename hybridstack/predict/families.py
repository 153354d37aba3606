"""Base-model predictors, rebuilt from finished model folders with no stage code.

A model folder describes itself: ``featurizer.joblib`` turns parsed rows into the fold
models' inputs, ``fold_<k>/`` holds each trained fold's model, ``config.json`` the swap
settings. :class:`FeaturizedModel` is the one generic predictor (load the featurizer and
the fold models, predict each fold with swap test-time averaging, average the folds exactly
as :func:`~hybridstack.heads.base.fit_oof` did); a model format other than joblib heads
(a fine-tuned transformer folder) registers its own loader in :data:`LOADERS` by stage kind.
Models whose featurizers have the same ``key`` (every head of one embedding encoder)
compute their features once per batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from accelerate import Accelerator

from hybridstack.errors import HybridstackError
from hybridstack.features.embed_matrix import EmbedFeaturizer
from hybridstack.features.tfidf import TfidfFeaturizer
from hybridstack.finetune import lora
from hybridstack.finetune.data import EncodedRows, TokenFeaturizer
from hybridstack.finetune.loop import predict_views as predict_token_views
from hybridstack.finetune.model import load_tokenizer, load_trained, resolve_mixed_precision
from hybridstack.finetune.token_store import TokenStore
from hybridstack.heads.base import fold_average, predict_views
from hybridstack.predict.source import RunContext
from hybridstack.runs import FEATURIZER_FILE, FOLD_MODEL_FILE, ModelDir, read_json
from hybridstack.tasks import Dataset


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


def rerun_hint(config: dict[str, Any], ctx: RunContext) -> str:
    return f"re-run its stage (`hybridstack run {config.get('stage')} -c {ctx.rerun_hint}`)"


def swap_permutation(config: dict[str, Any], ctx: RunContext) -> list[int] | None:
    """The label permutation of the swapped view when the model averages it at test time."""
    settings = config["settings"]
    for section in ("embed", "tfidf"):  # where older stages recorded the flag
        settings = {**settings.get(section, {}), **settings}
    return ctx.task.swap_permutation if settings.get("swap_tta", True) else None


# -- the generic predictor: a featurizer and a joblib head per trained fold --------------------


class FeaturizedModel:
    """A base model whose folder holds its featurizer and a joblib head per trained fold."""

    def __init__(self, model: ModelDir, config: dict[str, Any], ctx: RunContext,
                 featurizer: Any | None = None):
        hint = rerun_hint(config, ctx)
        self.name = model.name
        if featurizer is None:
            featurizer = joblib.load(required_file(model.path / FEATURIZER_FILE, model, hint))
        if hasattr(featurizer, "attach"):  # bound to this context (e.g. an embedding cache)
            featurizer = featurizer.attach(ctx, model.path)
        if not hasattr(featurizer, "key"):
            featurizer.key = f"featurizer:{model.name}"
        self.featurizer = featurizer
        prepare = getattr(featurizer, "prepare", None)
        run_dir = model.path.parent.parent
        self.heads = [
            joblib.load(required_file(model.fold_dir(k) / FOLD_MODEL_FILE, model, hint))
            for k in trained_folds(model)]
        if prepare is not None:  # e.g. re-attach the shared kNN pool
            self.heads = [prepare(head, run_dir) for head in self.heads]
        self.permutation = swap_permutation(config, ctx)

    def predict(self, views: tuple[Any, Any | None]) -> np.ndarray:
        """(n, C) float32 probabilities, mean over the fold models."""
        X, X_swap = views
        swapped = X_swap if self.permutation is not None else None
        return fold_average(predict_views(head, X, swapped, self.permutation)
                            for head in self.heads)


class TfidfModel(FeaturizedModel):
    """A tfidf-stage logistic regression: explained by its n-grams."""

    def __init__(self, model: ModelDir, config: dict[str, Any], ctx: RunContext):
        featurizer = None
        if not (model.path / FEATURIZER_FILE).is_file():
            # a run made before featurizer.joblib existed kept only its vectorizer
            hint = f"re-run `hybridstack run tfidf -c {ctx.rerun_hint}`"
            vectorizer = joblib.load(required_file(model.path / "vectorizer.joblib", model, hint))
            featurizer = TfidfFeaturizer(vectorizer, ctx.task.swap_fields)
        super().__init__(model, config, ctx, featurizer)


class EmbedModel(FeaturizedModel):
    """An embed-stage head (LightGBM, MLP or another registered kind; kNN-wrapped or not):
    explained by feature blocks when it is a LightGBM."""

    def __init__(self, model: ModelDir, config: dict[str, Any], ctx: RunContext):
        settings = config["settings"]
        featurizer = None
        if not (model.path / FEATURIZER_FILE).is_file():
            # a run made before featurizer.joblib existed: the same featurizer, from config.json
            featurizer = EmbedFeaturizer.from_settings(settings["embed"], settings["encoder_key"],
                                                       settings["feature_blocks"])
        super().__init__(model, config, ctx, featurizer)
        self.head_kind = settings["head"]  # e.g. "LGBMHead" or "MLPHead"
        self.blocks = [tuple(b) for b in settings["feature_blocks"]]


# -- a fine-tuned transformer: its own model format --------------------------------------------


class FinetuneFeaturizer:
    """Token ids rendered as the finetune stage rendered train and test."""

    def __init__(self, saved: TokenFeaturizer, tokenizer, key: str):
        self.saved, self.tokenizer, self.key = saved, tokenizer, key

    def transform(self, ds: Dataset) -> list[TokenStore]:
        """[ids] or [ids, swapped ids]: n rows' token ids per view."""
        return self.saved.render(self.tokenizer, ds.fields, ds.turns)


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
        saved_path = model.path / FEATURIZER_FILE
        saved = (joblib.load(saved_path) if saved_path.is_file()  # older runs: from config.json
                 else TokenFeaturizer.from_settings(settings, ctx.task.field_names,
                                                    ctx.task.swap_fields, is_decoder_run(settings)))
        self.featurizer = FinetuneFeaturizer(saved, tokenizer, f"finetune:{model.name}")
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

    def predict(self, views: list[TokenStore | list[list[int]]]) -> np.ndarray:
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

BaseModel = FeaturizedModel | FinetuneModel
# How each stage kind's model folder is loaded; a stage not named here (a new one whose
# folds are joblib heads over a saved featurizer) is predicted by FeaturizedModel.
LOADERS: dict[str, Callable[[ModelDir, dict[str, Any], RunContext], BaseModel]] = {
    "tfidf": TfidfModel, "embed": EmbedModel, "finetune": FinetuneModel}


def load_base_models(ctx: RunContext, names: list[str]) -> list[BaseModel]:
    """The predictor of every named base model, in order; models whose featurizers share a
    key (the embed heads of one encoder) share one featurizer."""
    shared: dict[str, Any] = {}
    models = []
    for name in names:
        model = ctx.dir.model(name)
        config = read_json(required_file(model.config_path, model, "re-run its stage"))
        stage = config.get("stage")
        loader = LOADERS.get(stage)
        if loader is None and not (stage and (model.path / FEATURIZER_FILE).is_file()):
            raise HybridstackError(
                f"models/{name}/config.json names no known stage ({stage!r}); it was written "
                "by an older hybridstack: re-run its stage and the stack")
        predictor = (loader or FeaturizedModel)(model, config, ctx)
        predictor.featurizer = shared.setdefault(predictor.featurizer.key, predictor.featurizer)
        models.append(predictor)
    return models
