"""Length and structure features of a text: how long it is and how it is laid out.

On LMSYS the length and formatting of a response (lists, code, headers) predict the
human preference about as well as its meaning, and toxic comments are short and
shouty, so these cheap counts go next to the embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

STRUCTURE_NAMES = ("chars", "words", "lines", "list_items", "code_blocks", "headers")

# A bullet ("- x", "* x", "+ x", "• x") or numbered ("1. x", "2) x") line.
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+\S", re.MULTILINE)
_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
_HEADER = re.compile(r"^[ \t]*#{1,6}[ \t]+\S", re.MULTILINE)


def structure_counts(texts: Sequence[str]) -> np.ndarray:
    """Raw counts of :data:`STRUCTURE_NAMES` per text.

    Parameters
    ----------
    texts : n strings.

    Returns
    -------
    (n, 6) float32: characters, words (whitespace-separated), non-empty lines,
    list items, fenced code blocks (an unclosed fence counts as a block), markdown headers.
    """
    out = np.zeros((len(texts), len(STRUCTURE_NAMES)), dtype=np.float32)
    for i, text in enumerate(texts):
        fences = len(_FENCE.findall(text))
        out[i] = (
            len(text),
            len(text.split()),
            sum(1 for line in text.split("\n") if line.strip()),
            len(_LIST_ITEM.findall(text)),
            (fences + 1) // 2,
            len(_HEADER.findall(text)),
        )
    return out


def log_counts(texts: Sequence[str]) -> np.ndarray:
    """``log1p`` of :func:`structure_counts`, (n, 6) float32.

    The log keeps the heavy tail (a 20k-character answer) from dominating a
    standardised MLP input, and turns differences of two texts into ratios.
    """
    return np.log1p(structure_counts(texts))
