"""Text cleaning (CleanSpeech report): lowercase, remove URLs, remove non-ASCII, whitespace."""

from __future__ import annotations

import re

from hybridstack.config import CleanConfig

_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*(?:\n\s*)+")
# json.loads joins a valid surrogate pair into one code point, so any surrogate left in a
# str is a lone one ("\\ud83d"): tokenizers cannot encode it (a TypeError deep in Rust)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> tuple[str, int]:
    """``text`` with every lone UTF-16 surrogate replaced by U+FFFD, and how many there were."""
    return _LONE_SURROGATE.subn("\ufffd", text)


def clean_text(text: str, cfg: CleanConfig) -> str:
    """Apply the configured cleaning steps; line breaks survive (they carry structure)."""
    if cfg.remove_urls:
        text = _URL.sub(" ", text)
    if cfg.remove_non_ascii:
        text = _NON_ASCII.sub(" ", text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.normalize_whitespace:
        text = _SPACES.sub(" ", text)
        text = _BLANK_LINES.sub("\n\n", text)
        text = "\n".join(line.strip() for line in text.split("\n")).strip()
    return text
