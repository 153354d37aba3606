"""The seed recipes shipped inside the wheel: the settings that win each reference competition.

A recipe is a TOML file in this folder holding every section but the competition's own
([task], [data] paths, experiment, workdir). ``hybridstack init <folder> --recipe NAME``
writes the detected part followed by the recipe text, comments included; configs/*.toml
in the repository are exactly that output for the Kaggle folders (a test checks it).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from hybridstack.errors import HybridstackError


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # the task kind it is made for
    competition: str  # the Kaggle competition's input folder name
    text: str  # the TOML text, comments included

    @property
    def sections(self) -> dict[str, Any]:
        return tomllib.loads(self.text)


RECIPES = {
    "lmsys": ("pairwise", "llm-classification-finetuning"),
    "lmsys-llm": ("pairwise", "llm-classification-finetuning"),  # Gemma-2-9B-class LoRA
    "jigsaw": ("multilabel", "jigsaw-toxic-comment-classification-challenge"),
}
# The recipe whose fine-tune settings `init --gpu` uses for a detected task kind.
RECIPE_FOR_KIND = {"pairwise": "lmsys", "multilabel": "jigsaw", "multiclass": "lmsys"}
# multiclass takes the LMSYS single-label settings on one text segment of 256 tokens
MULTICLASS_FINETUNE = {"max_length": 256}
# pairwise-only keys that mean nothing for a one-segment task
_PAIRWISE_ONLY = ("segment_budget", "swap_augment", "swap_tta")


def load_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise HybridstackError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    kind, competition = RECIPES[name]
    text = resources.files(__package__).joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return Recipe(name, kind, competition, text)


def finetune_recipe_for(kind: str) -> dict[str, Any]:
    """The GPU fine-tune settings for a task kind (the matching recipe's [finetune])."""
    settings = dict(load_recipe(RECIPE_FOR_KIND[kind]).sections["finetune"])
    if kind == "multiclass":
        for key in _PAIRWISE_ONLY:
            settings.pop(key, None)
        settings.update(MULTICLASS_FINETUNE)
    settings.pop("enabled", None)
    return settings
