"""Console set-up shared by every entry point: logging, and the one-line error guard."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from hybridstack.errors import HybridstackError, one_line

EXIT_USER_ERROR = 2
_NOISY_LOGGERS = ("httpx", "urllib3", "filelock", "sentence_transformers", "transformers",
                  "faiss.loader")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes (the llm extra) warns on import, which accelerate does, that a CPU kernel
    # package is missing: true on every CPU machine and irrelevant (4-bit needs CUDA anyway)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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
