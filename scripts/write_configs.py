"""Regenerate configs/<recipe>.toml: ``hybridstack init --recipe`` on Kaggle-shaped folders.

configs/ holds exactly what ``hybridstack init /kaggle/input/<competition> --recipe <name>``
writes on Kaggle (tests/test_recipes.py checks it). Run after editing a recipe:
``python scripts/write_configs.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from hybridstack.commands.init import InitOptions, init_config
from hybridstack.recipes import RECIPES
from hybridstack.synthetic import write_kaggle_competition

KAGGLE = Path("/kaggle")


def render(recipe: str, scratch: Path) -> str:
    """The config text init writes for ``recipe``, with the scratch root shown as /kaggle."""
    fake = scratch / "kaggle"
    os.environ["HYBRIDSTACK_INPUT_ROOT"] = str(fake / "input")
    folder = write_kaggle_competition(fake / "input", recipe)
    out = fake / "working" / f"{recipe}.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    init_config(InitOptions(folder, out, recipe=recipe))
    return out.read_text(encoding="utf-8").replace(str(fake), str(KAGGLE))


def main() -> int:
    configs = Path(__file__).resolve().parents[1] / "configs"
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in RECIPES:
            (configs / f"{recipe}.toml").write_text(render(recipe, Path(tmp).resolve()))
            print(f"wrote configs/{recipe}.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
