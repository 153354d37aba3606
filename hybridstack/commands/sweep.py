"""``hybridstack sweep``: one experiment per combination of config values.

Every combination is an experiment of its own (``<base>__<key>=<value>...``) in the same
workdir, so it shares the base config's fold assignment (copied from the base experiment,
identical by construction), the feature-matrix cache and the embedding cache: a sweep over
head settings encodes no text twice. Experiments already DONE are skipped by the stages;
a failing combination is reported and the sweep goes on.
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path

from hybridstack.commands.run import run_stage
from hybridstack.config import load_config
from hybridstack.errors import HybridstackError, one_line
from hybridstack.runs import copy_file
from hybridstack.stages import STAGE_ORDER


@dataclass
class GridAxis:
    key: str
    values: list[str]


def parse_grid(items: list[str]) -> list[GridAxis]:
    """``["finetune.lr=2e-5,3e-5", ...]`` -> axes; values stay text (parsed like --set)."""
    axes = []
    for item in items:
        if "=" not in item:
            raise HybridstackError(f"--grid {item!r}: expected section.key=v1,v2 (e.g. finetune.lr=2e-5,3e-5)")
        key, text = item.split("=", 1)
        values = _split_values(text)
        if not values:
            raise HybridstackError(f"--grid {item!r}: no values after '='")
        axes.append(GridAxis(key.strip(), values))
    return axes


def _split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes (so lists stay whole)."""
    values, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        values.append(current.strip())
    return values


def combination_name(base: str, combo: dict[str, str]) -> str:
    parts = [f"{key.split('.')[-1]}={value}" for key, value in combo.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "", "__".join([base, *parts]))


@dataclass
class SweepResult:
    experiment: str
    combo: dict[str, str]
    status: str  # "ok" or the error line
    seconds: float


def combination_overrides(name: str, combo: dict[str, str]) -> list[str]:
    return [f"experiment={name!r}", *(f"{key}={value}" for key, value in combo.items())]


def run_sweep(config_path: str | Path, grid: list[str], stage: str = "all",
              overrides: list[str] | None = None) -> list[SweepResult]:
    overrides = list(overrides or [])
    axes = parse_grid(grid)
    base_cfg = load_config(config_path, overrides)
    combos = [dict(zip([a.key for a in axes], values))
              for values in itertools.product(*(a.values for a in axes))]
    names = [combination_name(base_cfg.experiment, combo) for combo in combos]
    # validate every combination before running any, so a typo fails in seconds, not hours
    for name, combo in zip(names, combos):
        load_config(config_path, [*overrides, *combination_overrides(name, combo)])
    base_folds = base_cfg.run_dir / "folds.npy"
    results = []
    for i, (name, combo) in enumerate(zip(names, combos), 1):
        print(f"\n##### sweep {i}/{len(combos)}: {name}", flush=True)
        started = time.perf_counter()
        target = base_cfg.workdir / "runs" / name / "folds.npy"
        if base_folds.is_file() and not target.exists():
            copy_file(base_folds, target)  # the same folds for every combination
        try:
            run_stage(stage, str(config_path), [*overrides, *combination_overrides(name, combo)])
            status = "ok"
        except HybridstackError as err:
            status = one_line(err)
            print(f"error in {name}: {status} (continuing with the next combination)", flush=True)
        results.append(SweepResult(name, combo, status, time.perf_counter() - started))
    return results


# -- CLI ---------------------------------------------------------------------------------


def add_parser(sub) -> None:
    parser = sub.add_parser("sweep", help="one experiment per combination of config values")
    parser.add_argument("-c", "--config", required=True, help="the base experiment's TOML")
    parser.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                        help="a config key and its values, e.g. --grid embed.lgbm.num_leaves=15,31")
    parser.add_argument("--stage", choices=[*STAGE_ORDER, "all"], default="all",
                        help="run only this stage for each combination (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every combination")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from hybridstack.commands.compare import compare_rows, format_rows

    started = time.perf_counter()
    results = run_sweep(args.config, args.grid, args.stage, args.set)
    failed = [r for r in results if r.status != "ok"]
    print(f"\n##### sweep done in {time.perf_counter() - started:.0f}s: "
          f"{len(results) - len(failed)} ok, {len(failed)} failed")
    for r in failed:
        print(f"  FAILED {r.experiment}: {r.status}")
    workdir = load_config(args.config, args.set).workdir
    print(format_rows(compare_rows(workdir, experiments=[r.experiment for r in results]), "table"))
    return 1 if failed else 0
