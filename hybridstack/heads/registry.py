"""Every embed head kind in one list: its config list, its settings class and its builder.

The embed stage, its hashes and config.json, and the audit all go through this list, so a
new head kind is one module (its settings class and estimator) plus one line here::

    register(HeadKind("svm", SVMHeadSpec, build_svm))   # -> [[embed.svm]] in the config

A kind's settings class is a config section with a ``name`` (the model folder is
``<alias>_<name>``); the builder turns one entry into an unfitted head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybridstack.config import EmbedConfig, LGBMHead, MLPHead, register_head_list
from hybridstack.errors import HybridstackError
from hybridstack.heads.lgbm import LightGBMHead
from hybridstack.heads.mlp import TorchMLPHead


@dataclass(frozen=True)
class HeadKind:
    config_key: str  # the [[embed.<config_key>]] list of the config
    spec: type  # its settings (a config Section with a `name`)
    build: Callable[[Any, bool, int], Any]  # (spec, multilabel, seed) -> unfitted head


def _build_lgbm(spec: LGBMHead, multilabel: bool, seed: int) -> LightGBMHead:
    return LightGBMHead(multilabel=multilabel, random_state=seed, **spec.model_dump(exclude={"name"}))


def _build_mlp(spec: MLPHead, multilabel: bool, seed: int) -> TorchMLPHead:
    params = spec.model_dump(exclude={"name"})
    params["hidden_sizes"] = tuple(params["hidden_sizes"])
    return TorchMLPHead(multilabel=multilabel, random_state=seed, **params)


EMBED_HEADS: dict[str, HeadKind] = {}


def register(kind: HeadKind) -> None:
    """Add a head kind; its config list ``[[embed.<key>]]`` becomes valid."""
    EMBED_HEADS[kind.config_key] = kind
    register_head_list(kind.config_key, kind.spec)


register(HeadKind("lgbm", LGBMHead, _build_lgbm))
register(HeadKind("mlp", MLPHead, _build_mlp))


def head_list_keys() -> set[str]:
    return set(EMBED_HEADS)


def configured_heads(embed: EmbedConfig) -> list[Any]:
    """Every configured head entry, kind by kind in registry order."""
    return [spec for kind in EMBED_HEADS.values() for spec in embed.head_list(kind.config_key)]


def kind_of(spec: Any) -> HeadKind:
    return kind_named(type(spec).__name__)


def kind_named(spec_type: str) -> HeadKind:
    """The kind whose settings class is called ``spec_type`` (what config.json records)."""
    for kind in EMBED_HEADS.values():
        if kind.spec.__name__ == spec_type:
            return kind
    raise HybridstackError(f"head kind {spec_type!r} is not registered (known: "
                           f"{', '.join(k.spec.__name__ for k in EMBED_HEADS.values())}); "
                           "import the module that registers it")


def build_head(spec: Any, multilabel: bool, seed: int) -> Any:
    return kind_of(spec).build(spec, multilabel, seed)
