"""Why a prediction came out as it did.

* TF-IDF logistic regression: the n-grams of the row with the largest ``coef * tfidf``
  contribution to a label's logit, averaged over the fold models.
* LightGBM heads: LightGBM's own SHAP values (``pred_contrib``, TreeSHAP) of the length,
  similarity and kNN features; each embedding block is summed into one entry, since its
  single dimensions mean nothing to a reader. Units: the head's raw score (log-odds).
* The stacker: each base model's share (``stack/weights.json``). MLP heads and fine-tuned
  transformers get no finer explanation; their weight in the blend shows there.

Pairwise models are explained on the original A/B order (predictions also average the
swapped view).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from hybridstack.features.knn import KNNFeatureHead
from hybridstack.features.lengths import STRUCTURE_NAMES
from hybridstack.heads.lgbm import LightGBMHead
from hybridstack.heads.logreg import LogRegHead


class NgramNames:
    """Names of the TF-IDF columns: the vectorizer's n-grams, repeated once per field block.

    Parameters
    ----------
    vectorizer : the fitted FeatureUnion of word and char TfidfVectorizers.
    block_fields : the field each width-V block of the feature matrix comes from, in
        column order (single text: ["text"]; pairwise: prompt, A, B, A-B, the layout of
        :func:`hybridstack.features.tfidf.transform_rows`).
    """

    def __init__(self, vectorizer: Any, block_fields: list[str]):
        self.ngrams = vectorizer.get_feature_names_out()  # "word__idiot", "char__ idi"
        self.block_fields = block_fields

    def __call__(self, column: int) -> dict[str, str]:
        block, j = divmod(int(column), len(self.ngrams))
        analyzer, ngram = str(self.ngrams[j]).split("__", 1)
        return {"ngram": ngram, "analyzer": analyzer, "field": self.block_fields[block]}


def tfidf_block_fields(field_names: list[str], swap_fields: tuple[str, str] | None) -> list[str]:
    """Field of each vectorizer-wide block: ``[text]`` or ``[prompt, a, b, a-b]`` (pairwise)."""
    if swap_fields is None:
        return list(field_names)
    a, b = swap_fields
    return [*(f for f in field_names if f not in (a, b)), a, b, f"{a}-{b}"]


def ngram_contributions(heads: list[LogRegHead], X: sp.csr_matrix, label: int,
                        names: NgramNames, top_k: int = 8) -> list[list[dict[str, Any]]]:
    """The n-grams that pushed each row towards ``label`` most.

    Parameters
    ----------
    heads : the fold models. X : (n, d) TF-IDF rows. label : column index.
    names : column -> n-gram name. top_k : n-grams kept per row.

    Returns
    -------
    Per row, up to ``top_k`` dicts (ngram, analyzer, field, contribution) with a positive
    contribution, largest first; every n-gram occurs in the row (its TF-IDF value is > 0).
    """
    total = None
    for head in heads:
        if not head.multilabel and label not in head.classes_:
            continue  # a class absent from this fold's training rows contributes nothing
        terms = sp.csr_matrix(head.decision_terms(X, label), dtype=np.float64)
        total = terms if total is None else total + terms
    out = []
    for i in range(X.shape[0]):
        if total is None:
            out.append([])
            continue
        row = total.getrow(i) / len(heads)
        order = np.argsort(-row.data, kind="stable")[:top_k]
        out.append([{**names(row.indices[j]), "contribution": float(row.data[j])}
                    for j in order if row.data[j] > 0])
    return out


def tree_feature_groups(blocks: list[tuple[str, int]], label_names: list[str]) -> list[tuple[str, int]]:
    """(name, width) groups of the LightGBM input columns, in order.

    Length blocks ("len_*") are split into their counts, width-1 blocks keep their name,
    wider blocks are embeddings (summed into one entry); with kNN the group column is
    replaced by the kNN features (mean neighbour label per column, top and mean similarity).
    """
    groups: list[tuple[str, int]] = []
    for name, width in blocks:
        if name == "knn_group":
            groups += [(f"knn_mean_{label}", 1) for label in label_names]
            groups += [("knn_top_similarity", 1), ("knn_mean_similarity", 1)]
        elif name.startswith("len_"):
            groups += [(f"{name}:{count}", 1) for count in STRUCTURE_NAMES]
        elif width == 1:
            groups.append((name, 1))
        else:
            groups.append((f"{name} embedding ({width} dims)", width))
    return groups


def _booster_inputs(head: Any, X: np.ndarray) -> tuple[LightGBMHead, np.ndarray]:
    """The LightGBM head inside ``head`` and the matrix its boosters see."""
    if isinstance(head, KNNFeatureHead):
        # as KNNFeatureHead.predict_proba: group column dropped, kNN features appended
        return head.base_head_, np.hstack([X[:, :-1], head.knn_features(X)]).astype(np.float32)
    return head, X


def tree_contributions(heads: list[Any], X: np.ndarray, label: int, n_classes: int,
                       groups: list[tuple[str, int]], top_k: int = 8) -> list[list[dict[str, Any]]]:
    """TreeSHAP contributions of each feature group to ``label``'s raw score, mean over folds.

    Parameters
    ----------
    heads : fold models (LightGBMHead, or KNNFeatureHead around one).
    X : (n, d) embed-stage features. label : column index. n_classes : C.
    groups : from :func:`tree_feature_groups`. top_k : groups kept per row.

    Returns
    -------
    Per row, up to ``top_k`` dicts (feature, contribution) with a non-zero contribution,
    largest absolute value first.
    """
    widths = np.array([w for _, w in groups])
    bounds = np.concatenate([[0], np.cumsum(widths)])
    total = np.zeros((len(X), len(groups)))
    for head in heads:
        lgbm, inputs = _booster_inputs(head, X)
        booster = lgbm.boosters_[label if lgbm.multilabel else 0]
        if isinstance(booster, float):
            continue  # a label constant in this fold: no feature moves it
        # num_iteration=None: the early-stopped best iteration, as LightGBMHead predicts
        contrib = booster.predict(inputs, pred_contrib=True)
        if not lgbm.multilabel:  # (n, C * (d + 1)): one block per class, bias last
            contrib = contrib.reshape(len(X), n_classes, -1)[:, label]
        total += np.add.reduceat(contrib[:, :-1], bounds[:-1], axis=1)
    total /= len(heads)
    out = []
    for row in total:
        order = np.argsort(-np.abs(row), kind="stable")[:top_k]
        out.append([{"feature": groups[j][0], "contribution": float(row[j])}
                    for j in order if row[j] != 0])  # unused features are no reason
    return out


def stack_shares(weights: dict[str, Any]) -> dict[str, Any]:
    """The stacker's method and each base model's share, from ``stack/weights.json``."""
    return {"method": weights["method"], "kind": weights["kind"],
            "shares": {name: float(w) for name, w in weights["weights"].items()}}
