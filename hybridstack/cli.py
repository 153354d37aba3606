"""The ``hybridstack`` command: argparse only. Each sub-command lives in ``commands/<name>.py``
and registers itself through ``add_parser(subparsers)``.

Every user-fixable problem surfaces as one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from hybridstack.commands import (
    audit,
    cache,
    compare,
    demo,
    init,
    predict,
    report,
    run,
    score,
    serve,
    sweep,
    ui,
)
from hybridstack.console import run_guarded, setup_logging
from hybridstack.progress import set_quiet

# In the order `hybridstack --help` lists them.
COMMANDS = (run, init, demo, sweep, compare, score, report, audit, cache, predict, serve, ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridstack",
        description="Staged hybrid text classification: tfidf -> embed -> finetune -> stack.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or log lines: results, warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.quiet:
        set_quiet(True)
    setup_logging(args.verbose)
    code = run_guarded(lambda: args.func(args))
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
