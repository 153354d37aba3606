"""Reading CSV/TSV files robustly: delimiter, encoding and header handling.

Non-UTF-8 bytes are decoded with replacement (and counted) instead of crashing:
scraped competition text often holds a few stray Latin-1 bytes.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hybridstack.errors import HybridstackError, one_line

log = logging.getLogger(__name__)


@dataclass
class Table:
    frame: pd.DataFrame
    path: Path
    n_bad_bytes: int


class _ByteCounter:
    """A codecs error handler that replaces undecodable bytes and counts them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, err: UnicodeDecodeError) -> tuple[str, int]:
        self.count += err.end - err.start
        return "\ufffd", err.end


_counter = _ByteCounter()
codecs.register_error("hybridstack_count", _counter)


def guess_delimiter(path: Path, first_line: str) -> str:
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    if "\t" in first_line and "," not in first_line:
        return "\t"
    return ","


def read_table(
    path: str | Path,
    delimiter: str | None = None,
    column_names: list[str] | None = None,
) -> Table:
    """Read a delimited text file with every column as ``str`` (missing cells become "")."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise HybridstackError(f"file not found: {path} (check the path in the config)") from None
    except OSError as err:
        raise HybridstackError(f"cannot read {path}: {err.strerror}") from None
    if not raw.strip():
        raise HybridstackError(f"{path} is empty: it needs a header line and at least one row")
    _counter.count = 0
    text = raw.decode("utf-8-sig", errors="hybridstack_count")
    n_bad = _counter.count
    if n_bad:
        log.warning("%s: %d bytes were not valid UTF-8 and were replaced with U+FFFD", path.name, n_bad)
    sep = delimiter or guess_delimiter(path, text.split("\n", 1)[0])
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            dtype=str,
            keep_default_na=False,  # NaN text is kept as "" and counted, never the string "nan"
            header=None if column_names else "infer",
            names=column_names,
        )
    except pd.errors.EmptyDataError:
        raise HybridstackError(f"{path} has no rows") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise HybridstackError(
            f"{path}: cannot parse as delimited text ({one_line(err)}); check data.delimiter"
        ) from None
    if frame.empty:
        raise HybridstackError(f"{path} has a header but no rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    return Table(frame=frame, path=path, n_bad_bytes=n_bad)


def require_columns(table: Table, columns: list[str], hint: str) -> None:
    missing = [c for c in columns if c not in table.frame.columns]
    if not missing:
        return
    found = list(table.frame.columns)
    shown = ", ".join(repr(c) for c in found[:8]) + (" ..." if len(found) > 8 else "")
    extra = " (one column only: wrong delimiter? set data.delimiter)" if len(found) == 1 else ""
    raise HybridstackError(
        f"{table.path.name}: missing column(s) {', '.join(repr(c) for c in missing)}; "
        f"found {shown}{extra}; {hint}"
    )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
