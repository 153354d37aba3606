"""The ``hybridstack`` command: parses arguments and calls stages; no logic of its own.

Every user-fixable problem surfaces as one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from hybridstack.config import load_config
from hybridstack.errors import HybridstackError, one_line
from hybridstack.stages import STAGE_ORDER

EXIT_USER_ERROR = 2


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "sentence_transformers", "transformers",
                  "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_guarded(action: Callable[[], object]) -> int:
    """Run ``action``; turn user errors into one line on stderr and a non-zero exit."""
    try:
        result = action()
    except HybridstackError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def run_stage(name: str, config_path: str, overrides: list[str], num_processes: int = 1,
              cpu: bool = False) -> int:
    """Run one stage or all in order; the fine-tune on ``num_processes`` data-parallel processes.

    Returns the exit status (non-zero when a multi-process fine-tune failed; the later
    stages are then not run).
    """
    cfg = load_config(config_path, overrides)
    stages = STAGE_ORDER if name == "all" else (name,)
    for stage in stages:
        print(f"== stage {stage} ==", flush=True)
        if stage == "finetune" and num_processes > 1:
            from hybridstack.finetune.launch import launch_multiprocess

            code = launch_multiprocess(config_path, overrides, num_processes, cpu=cpu)
            if code != 0:
                return code
            continue
        importlib.import_module(f"hybridstack.stages.{stage}").run(cfg)
    if name == "all":
        _write_report_if_available(cfg)
    return 0


def _write_report_if_available(cfg) -> None:
    try:
        report = importlib.import_module("hybridstack.report")
    except ModuleNotFoundError:
        return
    report.write_report(cfg.run_dir)


# -- commands --------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    num_processes = args.num_processes or 1
    if num_processes > 1 and args.stage not in ("finetune", "all"):
        raise HybridstackError(f"--num-processes applies to the finetune stage (run finetune or run "
                               f"all), not to {args.stage}")
    return run_stage(args.stage, args.config, args.set, num_processes, cpu=args.cpu)


def cmd_demo(args: argparse.Namespace) -> None:
    from hybridstack.demo import run_demo

    run_demo(args.workdir, kinds=args.kind, rows=args.rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridstack",
        description="Staged hybrid text classification: tfidf -> embed -> finetune -> stack.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one stage (or all) of an experiment")
    run.add_argument("stage", choices=[*STAGE_ORDER, "all"])
    run.add_argument("-c", "--config", required=True, help="experiment TOML file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set finetune.lr=2e-5")
    run.add_argument("--num-processes", type=int, default=None,
                     help="finetune (also within run all): data-parallel processes (GPUs)")
    run.add_argument("--cpu", action="store_true", help="finetune: force CPU processes (gloo)")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="synthetic data of each task kind through every stage")
    demo.add_argument("--workdir", default="demo-runs", help="where the demo writes (default: demo-runs)")
    demo.add_argument("--kind", action="append", choices=["pairwise", "multilabel", "multiclass"],
                      help="only these task kinds (default: all three)")
    demo.add_argument("--rows", type=int, default=600, help="train rows per dataset")
    demo.set_defaults(func=cmd_demo)

    for module in _EXTRA_COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


# Modules that add a sub-command through ``add_parser(subparsers)``; each sets ``func``.
_EXTRA_COMMANDS: list[str] = [
    "hybridstack.sweep",
    "hybridstack.compare",
    "hybridstack.scaffold",  # init
    "hybridstack.score",
    "hybridstack.cache_cli",
    "hybridstack.report",
    "hybridstack.predict.cli",
    "hybridstack.audit",
]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    code = run_guarded(lambda: args.func(args))
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
