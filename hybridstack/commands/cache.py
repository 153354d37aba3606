"""``hybridstack cache``: list and prune the shared embedding cache.

    hybridstack cache info  [--workdir DIR | --cache-dir DIR]
    hybridstack cache prune [--model SUBSTR | --all] [--dry-run] [--workdir DIR | --cache-dir DIR]
    hybridstack cache prune --for-inference WORKDIR [--dry-run]

Without ``--model`` or ``--all``, ``prune`` removes only the leftovers of killed runs.
``--for-inference`` shrinks a training notebook's output to what ``hybridstack predict``
reads (Kaggle caps a notebook's output at 20 GB): it removes the feature matrices
(``cache/features``, rebuilt by any later training run) and the fine-tune resume state of
unfinished folds (``fold_<k>/last/``; finished folds drop theirs already).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from hybridstack.errors import HybridstackError
from hybridstack.features.embeddings import CacheFolder, scan_cache, stray_files

MB = 1024 * 1024


def cache_root(args: argparse.Namespace) -> Path:
    """``--cache-dir`` if given, else ``<workdir>/cache/embeddings`` (the config default)."""
    if args.cache_dir:
        return Path(args.cache_dir)
    return Path(args.workdir or ".") / "cache" / "embeddings"


def cmd_info(args: argparse.Namespace) -> None:
    root = cache_root(args)
    folders = scan_cache(root)
    if not folders:
        print(f"no embedding cache in {root}")
        return
    header = ("key", "model", "prefix", "max_seq_length", "dtype", "rows", "shards", "MB")
    rows = [header, *(_info_row(f) for f in folders)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    total = sum(f.n_bytes for f in folders) / MB
    print(f"{len(folders)} folder(s), {total:.1f} MB in {root}")


def _info_row(folder: CacheFolder) -> tuple[str, ...]:
    manifest = folder.manifest or {}
    return (
        folder.path.name,
        str(manifest.get("model", "?")),
        repr(manifest["prefix"]) if "prefix" in manifest else "?",
        str(manifest.get("max_seq_length", "?")),
        str(manifest.get("dtype", "?")),
        str(folder.rows),
        str(folder.shards),
        f"{folder.n_bytes / MB:.1f}",
    )


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def training_only_paths(workdir: Path) -> list[Path]:
    """What a finished workdir holds that predicting never reads."""
    doomed = [workdir / "cache" / "features"]
    doomed += sorted((workdir / "runs").glob("*/models/*/fold_*/last"))
    doomed += sorted((workdir / "runs").glob("*/models/*/fold_*/.last.*"))  # killed mid-write
    return [p for p in doomed if p.exists()]


def prune_for_inference(workdir: Path, dry_run: bool) -> None:
    if not (workdir / "runs").is_dir():
        raise HybridstackError(f"--for-inference {workdir}: no runs/ folder there; give the "
                               "workdir of a training run (e.g. /kaggle/working)")
    verb = "would remove" if dry_run else "removed"
    before = tree_bytes(workdir)
    freed = 0
    for path in training_only_paths(workdir):
        size = tree_bytes(path)
        freed += size
        print(f"{verb} {path} ({size / MB:.1f} MB)")
        if not dry_run:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"{verb} {freed / MB:.1f} MB; kept for inference: {(before - freed) / MB:.1f} MB "
          f"(of {before / MB:.1f} MB in {workdir})")


def cmd_prune(args: argparse.Namespace) -> None:
    if args.for_inference:
        prune_for_inference(Path(args.for_inference), args.dry_run)
        return
    root = cache_root(args)
    folders = scan_cache(root)
    verb = "would remove" if args.dry_run else "removed"
    doomed = [f for f in folders if args.all or (args.model and f.matches(args.model))]
    for folder in doomed:
        model = (folder.manifest or {}).get("model", "?")
        print(f"{verb} {folder.path} ({model}, {folder.rows} rows, {folder.n_bytes / MB:.1f} MB)")
        if not args.dry_run:
            shutil.rmtree(folder.path)
    n_stray = 0
    doomed_paths = {f.path for f in doomed}
    for folder in folders:
        if folder.path in doomed_paths:
            continue
        for path in stray_files(folder.path):
            print(f"{verb} leftover {path}")
            n_stray += 1
            if not args.dry_run:
                path.unlink(missing_ok=True)
    if args.model and not doomed:
        print(f"no cache folder in {root} matches --model {args.model!r}")
    freed = sum(f.n_bytes for f in doomed) / MB
    print(f"{verb} {len(doomed)} folder(s) ({freed:.1f} MB) and {n_stray} leftover file(s)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cache info`` and ``cache prune`` under the ``hybridstack`` command."""
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    # default None, not ".": argparse would not see "--workdir ." as clashing with --cache-dir
    group.add_argument("--workdir", default=None,
                       help="the cache is <workdir>/cache/embeddings (default: .)")
    group.add_argument("--cache-dir", default=None, help="the cache folder itself")

    cache = subparsers.add_parser("cache", help="list or prune the shared embedding cache")
    actions = cache.add_subparsers(dest="cache_command", required=True)
    info = actions.add_parser("info", parents=[where], help="one row per cache folder")
    info.set_defaults(func=cmd_info)
    prune = actions.add_parser("prune", parents=[where],
                               help="remove cache folders and leftovers of killed runs")
    which = prune.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="SUBSTR",
                       help="remove folders whose model name, path or key contains SUBSTR")
    which.add_argument("--all", action="store_true", help="remove every cache folder")
    which.add_argument("--for-inference", metavar="WORKDIR",
                       help="keep only what `hybridstack predict` reads: drop feature matrices "
                            "and fine-tune resume state under WORKDIR")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    prune.set_defaults(func=cmd_prune)
