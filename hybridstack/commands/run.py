"""``hybridstack run <stage|all> -c cfg.toml [--set k=v] [--num-processes N [--cpu]]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from hybridstack.commands.report import write_report
from hybridstack.errors import HybridstackError
from hybridstack.pipeline import run_stage as run_pipeline_stage
from hybridstack.stages import STAGE_ORDER


def run_stage(name: str, config_path: str | Path, overrides: list[str] | None = None,
              num_processes: int = 1, cpu: bool = False) -> int:
    """One stage, or ``all`` in order followed by the report; returns the exit status."""
    code, exp = run_pipeline_stage(name, config_path, overrides, num_processes, cpu)
    if code == 0 and name == "all":
        write_report(exp.dir.path, exp)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    num_processes = args.num_processes or 1
    if num_processes > 1 and args.stage not in ("finetune", "all"):
        raise HybridstackError(f"--num-processes applies to the finetune stage (run finetune or run "
                               f"all), not to {args.stage}")
    return run_stage(args.stage, args.config, args.set, num_processes, cpu=args.cpu)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run one stage (or all) of an experiment")
    run.add_argument("stage", choices=[*STAGE_ORDER, "all"])
    run.add_argument("-c", "--config", required=True, help="experiment TOML file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set finetune.lr=2e-5")
    run.add_argument("--num-processes", type=int, default=None,
                     help="finetune (also within run all): data-parallel processes (GPUs)")
    run.add_argument("--cpu", action="store_true", help="finetune: force CPU processes (gloo)")
    run.set_defaults(func=cmd_run)
