"""Stage embed: cached sentence embeddings -> features -> LightGBM and MLP heads.

The feature matrix is assembled in :mod:`hybridstack.features.embed_matrix` (built once,
cached in ``<workdir>/cache/features``); with ``embed.knn`` each head is wrapped in a
:class:`~hybridstack.features.knn.KNNFeatureHead`. Every ``[[embed.lgbm]]`` / ``[[embed.mlp]]``
entry is one model folder ``<alias>_<name>``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from hybridstack.config import Config, EmbedConfig
from hybridstack.experiment import Experiment
from hybridstack.features.embed_matrix import (
    FEATURE_LAYOUT,
    EmbedFeatures,
    EmbedFeaturizer,
    group_keys,
    load_or_build_features,
)
from hybridstack.features.embeddings import EmbeddingCache, embed_cache_from_config
from hybridstack.features.knn import (
    GROUP_MAP_FILE,
    GroupMap,
    KNNFeatureHead,
    KnnPool,
    KnnSearchCache,
)
from hybridstack.features.lengths import STRUCTURE_NAMES
from hybridstack.heads.base import FoldStore, SwapView, fit_oof
from hybridstack.heads.registry import build_head, configured_heads, head_list_keys
from hybridstack.models import EMBEDDED_MINILM
from hybridstack.runs import FEATURIZER_FILE, write_joblib
from hybridstack.stages.common import (
    save_model_outputs,
    skip_if_done,
    stage_experiment,
    stage_main,
    write_best_submission,
)

log = logging.getLogger(__name__)

# Embed settings that do not change a head's predictions (the encoder key covers the rest;
# the head lists are excluded from the shared settings already).
_NOT_IN_HEAD_HASH = {"enabled", "alias", "cache_dir", "batch_size"}
# Leading words of model names that say nothing about the family ("all-MiniLM-L6-v2").
_GENERIC_WORDS = {"all", "paraphrase", "multilingual", "multi", "sentence", "msmarco", "nli"}


# -- naming --------------------------------------------------------------------------------


def embed_alias(embed: EmbedConfig) -> str:
    """Short model name for folder names: ``embed.alias`` or derived from ``embed.model``.

    "intfloat/e5-small-v2" -> "e5", "embedded:minilm" -> "minilm",
    "sentence-transformers/all-MiniLM-L6-v2" -> "minilm", "BAAI/bge-small-en" -> "bge".
    """
    if embed.alias:
        return embed.alias
    if embed.model == EMBEDDED_MINILM:
        return "minilm"
    words = [w for w in re.split(r"[^a-z0-9]+", Path(embed.model).name.lower()) if w]
    return next((w for w in words if w not in _GENERIC_WORDS), "embed")


# -- heads ---------------------------------------------------------------------------------


def make_head(spec: Any, exp: Experiment, features: EmbedFeatures, pool: KnnPool | None,
              search_cache: KnnSearchCache | None = None) -> Any:
    """The configured head (built by its registered kind), wrapped in a kNN-feature head
    over the experiment's shared pool when ``embed.knn`` is on; heads given one
    ``search_cache`` search each fold's neighbours once between them."""
    head = build_head(spec, exp.task.kind == "multilabel", exp.cfg.cv.seed)
    embed = exp.cfg.embed
    if not embed.knn:
        return head
    start, stop = features.key_columns
    return KNNFeatureHead(head, key_start=start, key_stop=stop, k=embed.knn_k,
                          index_kind=embed.knn_index, nprobe=embed.knn_nprobe, pool=pool,
                          search_cache=search_cache)


def knn_pool(exp: Experiment, features: EmbedFeatures) -> KnnPool:
    """Every row a kNN head may be fitted on (train, and its swapped view when augmenting),
    saved once under ``runs/<exp>/knn/``."""
    start, stop = features.key_columns
    keys = [features.X[:, start:stop]]
    if features.X_swap is not None and exp.cfg.embed.swap_augment:
        keys.append(features.X_swap[:, start:stop])
    pool = KnnPool.from_keys(keys)
    pool.save(exp.dir.path)
    return pool


def shared_embed_settings(embed: EmbedConfig) -> dict[str, Any]:
    """The [embed] settings every head shares (no head list of any registered kind)."""
    return embed.model_dump(mode="json", exclude=set(embed.head_list_keys()) | head_list_keys())


def head_config_hash(exp: Experiment, cache: EmbeddingCache, spec: Any) -> str:
    """What one head's DONE marker depends on: data, encoder, feature and head settings.

    Other heads' settings are left out, so adding or changing one head refits only it.
    """
    embed = {k: v for k, v in shared_embed_settings(exp.cfg.embed).items()
             if k not in _NOT_IN_HEAD_HASH}
    settings = {"embed": embed,
                "encoder": cache.key, "head": type(spec).__name__, "spec": spec.model_dump(),
                "layout": FEATURE_LAYOUT}
    if getattr(build_head(spec, exp.task.kind == "multilabel", exp.cfg.cv.seed), "early_stops", False):
        settings.update(exp.cfg.cv.early_stopping_settings())
    return exp.settings_hash(settings)


def fit_head(exp: Experiment, cache: EmbeddingCache, features: EmbedFeatures, pool: KnnPool | None,
             spec: Any, model_name: str, config_hash: str,
             search_cache: KnnSearchCache | None = None) -> None:
    """Cross-validate one head on the shared folds and save its outputs (DONE last)."""
    embed = exp.cfg.embed
    model = exp.dir.model(model_name)
    swap = None
    if exp.task.swap_permutation is not None:
        swap = SwapView(features.X_swap, features.X_test_swap, exp.task.swap_permutation,
                        augment=embed.swap_augment, tta=embed.swap_tta)
    result = fit_oof(make_head(spec, exp, features, pool, search_cache), features.X, exp.train.Y, exp.folds,
                     features.X_test, score=exp.task.score, swap=swap,
                     store=FoldStore(model.path, config_hash),
                     stopping_rows=exp.early_stopping_split())
    if embed.knn:
        # what predict numbers new rows' kNN groups by, so it never needs train.csv again
        train_groups = features.X[:, -1].astype(np.int64)
        GroupMap.from_keys(group_keys(exp.task, exp.train), train_groups).save(
            model.path / GROUP_MAP_FILE)
    write_joblib(model.path / FEATURIZER_FILE, EmbedFeaturizer.from_settings(
        embed.model_dump(mode="json"), cache.key, features.blocks,
        None if pool is None else pool.digest))
    settings = {
        "head": type(spec).__name__, "spec": spec.model_dump(),
        "embed": shared_embed_settings(embed),
        "encoder_key": cache.key, "feature_blocks": features.blocks,
        "knn_key_columns": features.key_columns, "length_features_order": list(STRUCTURE_NAMES),
    }
    save_model_outputs(exp, model, result, settings, config_hash, stage="embed")


def run(exp: Experiment | Config) -> None:
    """Fit every configured head (``[[embed.lgbm]]``, ``[[embed.mlp]]``, any registered kind)
    not DONE with this config.

    The feature matrix is built (or loaded from features/) only if some head needs fitting;
    the best finished base model then writes submission.csv.
    """
    exp = stage_experiment(exp, "embed")
    if exp is None:
        return
    cfg = exp.cfg
    cache = embed_cache_from_config(cfg)
    alias = embed_alias(cfg.embed)
    features = pool = None
    # the heads share each fold's kNN search (same rows, keys, labels and k): the first
    # head to fit a fold computes its neighbour features, the others read them
    search_cache = KnnSearchCache() if cfg.embed.knn else None
    for spec in configured_heads(cfg.embed):
        model_name = f"{alias}_{spec.name}"
        config_hash = head_config_hash(exp, cache, spec)
        if skip_if_done(exp.dir.model(model_name), config_hash):
            continue
        if features is None:
            features = load_or_build_features(exp, cache)
            pool = knn_pool(exp, features) if cfg.embed.knn else None
        fit_head(exp, cache, features, pool, spec, model_name, config_hash, search_cache)
    write_best_submission(exp)


if __name__ == "__main__":
    stage_main("embed", run)
