"""The ``hybridstack ui`` and ``hybridstack serve`` sub-commands.

Register them with ``add_ui_parser(subparsers)`` and ``add_serve_parser(subparsers)`` (or
both with ``add_parser``); each sets ``func``. Importing this module imports neither
streamlit nor fastapi nor uvicorn: without the extra, the command says which to install.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hybridstack.errors import HybridstackError
from hybridstack.live.core import require_extra

PAGE = Path(__file__).resolve().with_name("page.py")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_UI_PORT = 8501
DEFAULT_SERVE_PORT = 8000


def add_parser(subparsers: Any) -> None:
    """Both commands (the ``_EXTRA_COMMANDS`` convention of hybridstack.cli)."""
    add_ui_parser(subparsers)
    add_serve_parser(subparsers)


def add_ui_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ui", help="a local web page to try a finished experiment (needs the ui extra)",
        description="A Streamlit page over a finished experiment: type a text (pairwise: a "
                    "prompt and two responses), see each label's probability against its "
                    "threshold and why, the leaderboard and the report plots, score a CSV.")
    parser.add_argument("experiment_dir", help="runs/<experiment> with a finished stack")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_UI_PORT,
                        help=f"port (default {DEFAULT_UI_PORT})")
    parser.add_argument("--labels", help="the competition's test labels (e.g. test_labels.csv): "
                                         "adds each model's held-out score to the leaderboard")
    _add_cache_dir(parser)
    parser.set_defaults(func=cmd_ui)


def add_serve_parser(subparsers: Any) -> None:
    from hybridstack.live.batcher import DEFAULT_MAX_BATCH_ROWS, DEFAULT_WAIT_MS

    parser = subparsers.add_parser(
        "serve", help="an HTTP JSON API over a finished experiment (needs the serve extra)",
        description="FastAPI + uvicorn: POST /predict {\"rows\": [...]}, POST /explain "
                    "{\"row\": {...}}, GET /health, GET /info. Concurrent requests are "
                    "micro-batched into one predictor call.")
    parser.add_argument("experiment_dir", help="runs/<experiment> with a finished stack")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_SERVE_PORT,
                        help=f"port (default {DEFAULT_SERVE_PORT})")
    parser.add_argument("--max-rows", type=int, default=256,
                        help="most rows one /predict request may hold (default 256; more: 413)")
    parser.add_argument("--max-chars", type=int, default=20_000,
                        help="most characters one text column of a row may hold "
                             "(default 20000; more: 413)")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_WAIT_MS,
                        help=f"micro-batching: how long a request waits for others to share "
                             f"its predictor call (default {DEFAULT_WAIT_MS:g}; 0: off, one call "
                             "per request)")
    parser.add_argument("--max-batch-rows", type=int, default=DEFAULT_MAX_BATCH_ROWS,
                        help=f"most rows in one micro-batch (default {DEFAULT_MAX_BATCH_ROWS})")
    _add_cache_dir(parser)
    parser.set_defaults(func=cmd_serve)


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None,
                        help="where embeddings of new texts are written (default: a temporary "
                             "folder removed on exit); the run folder is only read")


def _check_common(args: argparse.Namespace) -> None:
    from hybridstack.predict.source import open_run

    if not 0 <= args.port <= 65535:
        raise HybridstackError(f"--port must be 0-65535, got {args.port}")
    open_run(args.experiment_dir)  # cheap: a wrong folder fails before anything loads


# -- ui ---------------------------------------------------------------------------------------


def ui_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line: headless, no usage statistics, no file watcher."""
    command = [sys.executable, "-m", "streamlit", "run", str(PAGE),
               "--server.headless", "true",
               "--server.address", args.host,
               "--server.port", str(args.port),
               "--server.fileWatcherType", "none",
               "--server.runOnSave", "false",
               "--browser.gatherUsageStats", "false",
               "--global.developmentMode", "false",
               "--client.toolbarMode", "minimal",
               "--theme.base", "light",
               "--", str(Path(args.experiment_dir).resolve())]
    if args.labels:
        command += ["--labels", str(Path(args.labels).resolve())]
    if args.cache_dir:
        command += ["--cache-dir", str(Path(args.cache_dir).resolve())]
    return command


def cmd_ui(args: argparse.Namespace) -> int:
    require_extra("ui", "ui")
    _check_common(args)
    if args.labels and not Path(args.labels).is_file():
        raise HybridstackError(f"--labels: file not found: {args.labels}")
    print(f"hybridstack ui: http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen(ui_command(args), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


# -- serve ------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    require_extra("serve", "serve")
    _check_common(args)
    for name in ("max_rows", "max_chars", "max_batch_rows"):
        if getattr(args, name) < 1:
            raise HybridstackError(f"--{name.replace('_', '-')} must be >= 1, got "
                                   f"{getattr(args, name)}")
    if args.batch_wait_ms < 0:
        raise HybridstackError(f"--batch-wait-ms must be >= 0 (0: off), got {args.batch_wait_ms}")
    import uvicorn

    from hybridstack.live.api import create_app
    from hybridstack.live.core import SERVE_CPU_ENCODE_BATCH, load_predictor, tune_for_serving

    predictor = tune_for_serving(load_predictor(args.experiment_dir, args.cache_dir),
                                 cpu_encode_batch=SERVE_CPU_ENCODE_BATCH)
    if not getattr(args, "verbose", False):  # the per-call INFO lines (embeddings) of each request
        logging.getLogger("hybridstack").setLevel(logging.WARNING)
    app = create_app(predictor, max_rows=args.max_rows, max_chars=args.max_chars,
                     batch_wait_ms=args.batch_wait_ms, max_batch_rows=args.max_batch_rows)
    batching = f"micro-batching {args.batch_wait_ms:g} ms" if args.batch_wait_ms > 0 else \
        "micro-batching off"
    print(f"hybridstack serve: {predictor.ctx.dir.path.name} ({predictor.task.kind}) on "
          f"http://{args.host}:{args.port} ({batching}); POST /predict, POST /explain, "
          "GET /health, GET /info", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                workers=1)


def main(argv: list[str] | None = None) -> int:
    """``python -m hybridstack.live ui|serve ...``: the two commands on their own."""
    from hybridstack.console import run_guarded, setup_logging

    parser = argparse.ArgumentParser(prog="python -m hybridstack.live")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_guarded(lambda: args.func(args))
