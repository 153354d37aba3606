"""The embed stage's feature matrix: cached sentence embeddings -> one row of features.

* single text (multilabel, multiclass): ``[text embedding | log length/structure counts]``;
* pairwise: ``[prompt, A, B, A - B, |A - B|, cos(prompt, A), cos(prompt, B), cos(A, B) |
  lengths of prompt, A, B, A - B]``, and the swapped view with A and B exchanged, used for
  swap augmentation and swap test-time averaging as in the tfidf stage;
* with ``embed.knn``: a last column holding each row's kNN exclusion group, read and
  dropped by :class:`~hybridstack.features.knn.KNNFeatureHead`. The kNN key is the text
  embedding, or for pairwise ``[prompt, A, B]`` (so the swapped view's key is
  ``[prompt, B, A]``, consistent with its permuted label). Rows of one group never see
  each other: pairwise groups are prompts (as the folds are), otherwise exact texts.

The matrices of an experiment are cached in ``<workdir>/cache/features`` (keyed by the data
fingerprint, the encoder and the feature settings); predict builds the same rows for new data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from hybridstack.errors import HybridstackError
from hybridstack.experiment import Experiment
from hybridstack.features.embeddings import EmbeddingCache
from hybridstack.features.knn import (
    GROUP_MAP_FILE,
    GroupMap,
    KNNFeatureHead,
    KnnPool,
)
from hybridstack.features.knn_index import normalize_rows
from hybridstack.features.lengths import log_counts
from hybridstack.runs import write_with
from hybridstack.tasks import Dataset, Task

log = logging.getLogger(__name__)

FEATURE_LAYOUT = 1  # bump when the feature layout changes: old cached matrices are then unused
MAX_EXACT_GROUPS = 2**24  # group ids travel as float32 columns, exact only up to 2^24


@dataclass
class EmbedFeatures:
    """The feature matrices of one experiment (float32; group column last when kNN is on)."""

    X: np.ndarray  # (n_train, d)
    X_test: np.ndarray | None  # (n_test, d)
    X_swap: np.ndarray | None  # pairwise: (n_train, d) with A and B exchanged
    X_test_swap: np.ndarray | None
    blocks: list[tuple[str, int]]  # (name, width) of each column block, in order
    key_columns: tuple[int, int]  # the kNN key's column range

    MATRICES = ("X", "X_test", "X_swap", "X_test_swap")

    def save(self, path: Path) -> None:
        """One uncompressed .npz (absent matrices left out), written atomically."""
        arrays = {k: getattr(self, k) for k in self.MATRICES if getattr(self, k) is not None}
        meta = json.dumps({"blocks": self.blocks, "key_columns": self.key_columns})
        write_with(path, lambda fh: np.savez(fh, meta=np.array(meta), **arrays))

    @classmethod
    def load(cls, path: Path) -> EmbedFeatures:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] if k in data else None for k in cls.MATRICES}
        return cls(**arrays, blocks=[tuple(b) for b in meta["blocks"]],
                   key_columns=tuple(meta["key_columns"]))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (n, d) ``a`` and ``b`` as (n, 1) float32."""
    return np.sum(normalize_rows(a) * normalize_rows(b), axis=1, keepdims=True)


def pairwise_view(emb: dict[str, np.ndarray], lengths: dict[str, np.ndarray] | None,
                  first: str, second: str) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Features of one ordering of the pair: ``(first, second)`` = (A, B) or (B, A).

    Parameters
    ----------
    emb : {"prompt", first, second} -> (n, e) embeddings.
    lengths : same keys -> (n, 6) log counts, or None to leave them out.

    Returns
    -------
    (n, 5e + 3 [+ 24]) float32 matrix and its (name, width) blocks.
    """
    p, a, b = emb["prompt"], emb[first], emb[second]
    parts = [("prompt", p), ("a", a), ("b", b), ("a_minus_b", a - b), ("abs_a_minus_b", np.abs(a - b)),
             ("cos_prompt_a", cosine(p, a)), ("cos_prompt_b", cosine(p, b)),
             ("cos_a_b", cosine(a, b))]
    if lengths is not None:
        la, lb = lengths[first], lengths[second]
        parts += [("len_prompt", lengths["prompt"]), ("len_a", la), ("len_b", lb),
                  ("len_a_minus_b", la - lb)]
    return _assemble(parts)


def single_view(emb: np.ndarray, lengths: np.ndarray | None) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """``[embedding | log counts]`` of one text per row, (n, e [+ 6]) float32, and its blocks."""
    parts = [("text", emb)] + ([("len_text", lengths)] if lengths is not None else [])
    return _assemble(parts)


def _assemble(parts: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, list[tuple[str, int]]]:
    matrix = np.hstack([block for _, block in parts]).astype(np.float32, copy=False)
    return matrix, [(name, block.shape[1]) for name, block in parts]


def group_keys(task: Task, ds: Dataset) -> np.ndarray:
    """Each row's kNN exclusion key: its fold group (pairwise: the prompt), else its exact text."""
    return ds.groups if ds.groups is not None else np.asarray(task.joined_text(ds), dtype=object)


def exclusion_groups(task: Task, splits: list[Dataset]) -> list[np.ndarray]:
    """Integer kNN exclusion group per row of each split, numbered over all splits together.

    The fold groups when the task has them (pairwise: the prompt), else the exact text, so
    duplicates in train, validation or test never serve as each other's neighbours.
    """
    keys = [group_keys(task, ds) for ds in splits]
    # factorize hashes the strings; np.unique would first copy them into a fixed-width
    # array as wide as the longest text (gigabytes for LMSYS-length prompts)
    codes, _ = pd.factorize(np.concatenate(keys))
    if codes.max(initial=0) >= MAX_EXACT_GROUPS:
        raise HybridstackError(
            f"embed.knn: {codes.max() + 1} distinct row groups exceed {MAX_EXACT_GROUPS}; "
            "set embed.knn = false for data this large"
        )
    return np.split(codes.astype(np.float32), np.cumsum([len(k) for k in keys])[:-1])


def encode_fields(cache: EmbeddingCache, task: Task, splits: list[Dataset]) -> list[dict[str, np.ndarray]]:
    """Embeddings of every text field of every split, from one cache call (shared texts once)."""
    texts = [t for ds in splits for name in task.field_names for t in ds.fields[name]]
    vectors = cache.encode(texts)
    out, start = [], 0
    for ds in splits:
        per_field = {}
        for name in task.field_names:
            per_field[name] = vectors[start:start + len(ds)]
            start += len(ds)
        out.append(per_field)
    stats = cache.last_stats
    log.info("embed: %d texts (%d unique): %d from cache, %d encoded in %.1fs",
             stats["n_texts"], stats["n_unique"], stats["n_cached"], stats["n_encoded"],
             stats["seconds"])
    return out


def split_views(task: Task, ds: Dataset, emb: dict[str, np.ndarray], length_features: bool
                ) -> tuple[np.ndarray, np.ndarray | None, list[tuple[str, int]], tuple[int, int]]:
    """One split's matrix, its swapped view (pairwise, else None), blocks and kNN key columns."""
    lengths = {name: log_counts(ds.fields[name]) for name in task.field_names} if length_features else None
    if task.swap_fields is None:
        X, blocks = single_view(emb["text"], None if lengths is None else lengths["text"])
        return X, None, blocks, (0, emb["text"].shape[1])
    a, b = task.swap_fields
    X, blocks = pairwise_view(emb, lengths, a, b)
    X_swap, _ = pairwise_view(emb, lengths, b, a)
    return X, X_swap, blocks, (0, 3 * emb["prompt"].shape[1])  # key: [prompt, first, second]


def build_features(exp: Experiment, cache: EmbeddingCache) -> EmbedFeatures:
    """Encode (through the cache) and assemble the train/test matrices of ``exp``."""
    task, embed = exp.task, exp.cfg.embed
    splits = [exp.train] + ([exp.test] if exp.test is not None else [])
    views = [split_views(task, ds, emb, embed.length_features)
             for ds, emb in zip(splits, encode_fields(cache, task, splits), strict=True)]
    matrices = [(X, X_swap) for X, X_swap, _, _ in views]
    _, _, blocks, key_columns = views[0]
    if embed.knn:
        with_group = [
            tuple(None if m is None else np.hstack([m, group[:, None]]) for m in pair)
            for pair, group in zip(matrices, exclusion_groups(task, splits), strict=True)
        ]
        matrices, blocks = with_group, [*blocks, ("knn_group", 1)]
    X, X_swap = matrices[0]
    X_test, X_test_swap = matrices[1] if exp.test is not None else (None, None)
    return EmbedFeatures(X, X_test, X_swap, X_test_swap, blocks, key_columns)


def features_cache_path(exp: Experiment, cache: EmbeddingCache) -> Path:
    """Keyed like the tfidf matrix: data fingerprint + the settings the matrix depends on."""
    embed = exp.cfg.embed
    params = {"layout": FEATURE_LAYOUT, "encoder": cache.key,
              "length_features": embed.length_features, "knn": embed.knn}
    key = hashlib.sha256((exp.fingerprint + json.dumps(params, sort_keys=True)).encode()).hexdigest()
    return exp.dir.features_dir / f"embed_{key[:16]}.npz"


def load_or_build_features(exp: Experiment, cache: EmbeddingCache) -> EmbedFeatures:
    """The feature matrices of this experiment, built once and cached in features/."""
    path = features_cache_path(exp, cache)
    started = time.perf_counter()
    if path.is_file():
        features = EmbedFeatures.load(path)
        log.info("embed: reused cached features %s (%.1fs)", path.name, time.perf_counter() - started)
        return features
    features = build_features(exp, cache)
    features.save(path)
    log.info("embed: built %d features in %.1fs -> %s", features.X.shape[1],
             time.perf_counter() - started, path.name)
    return features


# -- the saved featurizer: new rows -> the same features, at predict time ----------------------


class FeatureViews(NamedTuple):
    X: np.ndarray  # (n, d) float32, kNN group column last when kNN is on
    X_swap: np.ndarray | None  # pairwise: A and B exchanged


ENCODER_SETTINGS = ("model", "max_seq_length", "prefix", "normalize", "dtype", "batch_size")


@dataclass
class EmbedFeaturizer:
    """What turns rows into an embed head's features: saved as every embed model's
    ``featurizer.joblib``, so predict needs neither train.csv nor stage code.

    It holds the encoder settings (texts are embedded through an :class:`EmbeddingCache`
    that reads the training run's cache), the feature options and layout, and the digest
    of the kNN pool its fold heads point into; the training rows' kNN groups by key are the
    model folder's ``knn_groups.npz``.
    """

    encoder: dict[str, Any]  # EmbeddingCache settings (ENCODER_SETTINGS)
    encoder_key: str  # the cache key of the encoder the heads were trained on
    cache_dir: str | None  # the training run's embed.cache_dir (None: <workdir>/cache/embeddings)
    length_features: bool
    knn: bool
    blocks: list[tuple[str, int]]
    pool_digest: str | None = None

    @classmethod
    def from_settings(cls, embed: dict[str, Any], encoder_key: str, blocks: list,
                      pool_digest: str | None = None) -> EmbedFeaturizer:
        """From the [embed] settings (``EmbedConfig.model_dump(mode="json")``)."""
        return cls({k: embed[k] for k in ENCODER_SETTINGS}, encoder_key,
                   None if embed.get("cache_dir") is None else str(embed["cache_dir"]),
                   embed["length_features"], embed["knn"], [tuple(b) for b in blocks],
                   pool_digest)

    @property
    def key(self) -> str:
        """Models with the same key share features: every head of one encoder."""
        return f"embed:{self.encoder_key}:{self.length_features}:{self.knn}"

    def attach(self, ctx: Any, model_path: Path) -> AttachedEmbedFeaturizer:
        """Bound to a predict context (``ctx.task``, ``ctx.cache_dir``, ``ctx.dir``) and
        the model folder it was loaded from."""
        return AttachedEmbedFeaturizer(self, ctx, model_path)

    def transform(self, ds: Dataset, task: Task, cache: EmbeddingCache,
                  groups: np.ndarray | None = None) -> FeatureViews:
        """Features of parsed rows ``ds``; ``groups``: their (n,) kNN groups when kNN is on."""
        emb = encode_fields(cache, task, [ds])[0]
        X, X_swap, blocks, _ = split_views(task, ds, emb, self.length_features)
        if self.knn:
            X = np.hstack([X, groups[:, None]])
            X_swap = None if X_swap is None else np.hstack([X_swap, groups[:, None]])
            blocks = [*blocks, ("knn_group", 1)]
        if blocks != self.blocks:
            raise HybridstackError(f"feature layout {blocks} differs from the trained {self.blocks}; "
                                   "re-run the embed stage")
        return FeatureViews(X, X_swap)


class AttachedEmbedFeaturizer:
    """An :class:`EmbedFeaturizer` with its embedding cache opened for a predict context.

    Only texts missing from the training run's cache are encoded, into ``ctx.cache_dir``.
    New rows get the kNN group of a training row with the same key (the model folder's
    group map); a run saved before group maps existed numbers them over its train rows.
    """

    def __init__(self, saved: EmbedFeaturizer, ctx: Any, model_path: Path):
        self.saved, self.ctx, self.key = saved, ctx, saved.key
        map_path = Path(model_path) / GROUP_MAP_FILE
        self.group_map = GroupMap.load(map_path) if saved.knn and map_path.is_file() else None
        trained = (Path(saved.cache_dir) if saved.cache_dir
                   else ctx.dir.path.parent.parent / "cache" / "embeddings")
        self.cache = EmbeddingCache(ctx.cache_dir, **saved.encoder, read_only_roots=[trained])
        if self.cache.key != saved.encoder_key:
            raise HybridstackError(
                f"the embed models were trained on encoder {saved.encoder_key} but "
                f"embed.model now gives {self.cache.key} (model files changed); re-run the "
                "embed stage")
        self._pools: dict[str, KnnPool] = {}

    def transform(self, ds: Dataset) -> FeatureViews:
        groups = None
        if self.group_map is not None:
            groups = self.group_map.lookup(group_keys(self.ctx.task, ds))
        elif self.saved.knn:
            # numbered over [train, new] exactly as over [train, test] at training time
            groups = exclusion_groups(self.ctx.task, [self.ctx.train, ds])[1]
        return self.saved.transform(ds, self.ctx.task, self.cache, groups)

    def prepare(self, head: Any, run_dir: Path) -> Any:
        """A fold head loaded from ``run_dir``'s models, with the experiment's kNN pool
        attached when it points into one (each pool is loaded once)."""
        digest = getattr(head, "pool_digest_", None)
        if isinstance(head, KNNFeatureHead) and digest:
            if digest not in self._pools:
                self._pools[digest] = KnnPool.load(run_dir, digest)
            head.attach_pool(self._pools[digest])
        return head
