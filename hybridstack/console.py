"""Console set-up shared by every entry point: logging, and the one-line error guard."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from hybridstack.errors import HybridstackError, one_line
from hybridstack.progress import is_quiet

EXIT_USER_ERROR = 2
_NOISY_LOGGERS = ("httpx", "urllib3", "filelock", "sentence_transformers", "transformers",
                  "faiss.loader")


def setup_logging(verbose: bool = False) -> None:
    """INFO lines (DEBUG with ``verbose``; warnings only under ``hybridstack --quiet``, which
    reaches the processes it starts through the environment)."""
    level = logging.DEBUG if verbose else logging.WARNING if is_quiet() else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes (the llm extra) warns on import, which accelerate does, that a CPU kernel
    # package is missing: true on every CPU machine and irrelevant (4-bit needs CUDA anyway)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if is_quiet() or not sys.stderr.isatty():
        quiet_library_bars()


def quiet_library_bars() -> None:
    """No Hugging Face bars (weights loading, downloads) in a log file or under --quiet: in a
    committed notebook each would leave one line per update. Read at import, so set early."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


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
