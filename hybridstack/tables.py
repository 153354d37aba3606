"""Reading CSV/TSV files robustly: delimiter, encoding, header handling and compression.

Non-UTF-8 bytes are decoded with replacement (and counted) instead of crashing:
scraped competition text often holds a few stray Latin-1 bytes.

Compressed inputs (``train.csv.zip``, ``test.tsv.gz``, ...; Kaggle ships Jigsaw that way)
are read like the CSV/TSV they hold: a zip must hold exactly one data file (``__MACOSX/``
and ``.DS_Store`` entries are ignored), and the delimiter follows the inner extension.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import logging
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

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


# -- compressed files -------------------------------------------------------------------

COMPRESSIONS = {".zip": "zip", ".gz": "gzip"}
DATA_SUFFIXES = (".csv", ".tsv")
HEAD_BYTES = 1 << 16  # enough decompressed text to sniff a header line


def compression_of(path: str | Path) -> str | None:
    """``"zip"``, ``"gzip"`` or None (a plain file), from the file name's last extension."""
    return COMPRESSIONS.get(Path(path).suffix.lower())


def data_suffix(path: str | Path) -> str:
    """The extension of the data inside: ``.csv`` for ``x.csv``, ``x.csv.zip`` and ``x.csv.gz``.

    Lower-cased; "" when there is none (``x.zip``).
    """
    path = Path(path)
    if compression_of(path) is not None:
        path = Path(path.stem)
    return path.suffix.lower()


def table_file_names(stem: str) -> tuple[str, ...]:
    """The file names a table called ``stem`` may have, plain ones first.

    ``table_file_names("train")`` -> ``("train.csv", "train.tsv", "train.csv.zip",
    "train.csv.gz", "train.tsv.zip", "train.tsv.gz")``.
    """
    plain = tuple(f"{stem}{suffix}" for suffix in DATA_SUFFIXES)
    return plain + tuple(f"{name}{ext}" for name in plain for ext in COMPRESSIONS)


def _ignored_member(info: zipfile.ZipInfo) -> bool:
    name = info.filename
    return (info.is_dir() or name.startswith("__MACOSX/")
            or name.rsplit("/", 1)[-1] == ".DS_Store")


def _zip_member(archive: zipfile.ZipFile, path: Path) -> zipfile.ZipInfo:
    members = [info for info in archive.infolist() if not _ignored_member(info)]
    if not members:
        raise HybridstackError(f"{path}: the zip holds no data file; point the config at the CSV/TSV itself")
    if len(members) > 1:
        shown = ", ".join(repr(m.filename) for m in members[:6]) + (" ..." if len(members) > 6 else "")
        raise HybridstackError(
            f"{path}: the zip holds {len(members)} files ({shown}); a zipped table must hold exactly "
            "one CSV/TSV: unzip it and point the config at the file you mean"
        )
    return members[0]


_BROKEN = (zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error, NotImplementedError)


def _broken(path: Path, err: BaseException) -> HybridstackError:
    kind = compression_of(path) or "data"
    if isinstance(err, NotImplementedError):  # e.g. Deflate64, which Windows writes for big zips
        return HybridstackError(f"{path}: the zip uses an unsupported compression method "
                                f"({one_line(err)}); unzip it and point the config at the CSV/TSV")
    return HybridstackError(f"{path}: cannot read as {kind} ({one_line(err) or type(err).__name__}); "
                            "the file is corrupt or truncated: copy or download it again")


@contextmanager
def open_data(path: str | Path) -> Iterator[BinaryIO]:
    """The decompressed bytes of a table file as a binary stream (plain files as they are).

    Only what is read gets decompressed. A broken archive, or a zip that does not hold exactly
    one data file, is a one-line :class:`HybridstackError` (also when it shows while reading);
    a missing or unreadable file raises the usual ``OSError`` for the caller to word.
    """
    path = Path(path)
    kind = compression_of(path)
    try:
        if kind is None:
            with open(path, "rb") as fh:
                yield fh
        elif kind == "gzip":
            with gzip.open(path, "rb") as fh:
                yield fh  # type: ignore[misc]
        else:
            with zipfile.ZipFile(path) as archive, archive.open(_zip_member(archive, path)) as fh:
                yield fh  # type: ignore[misc]
    except _BROKEN as err:
        if kind is None:
            raise
        raise _broken(path, err) from None


@contextmanager
def open_text(path: str | Path) -> Iterator[TextIO]:
    """Like :func:`open_data`, decoded as UTF-8 (BOM dropped, bad bytes replaced, newlines kept).

    For streaming readers: ``with open_text(p) as fh: pd.read_csv(fh, chunksize=...)``.
    """
    with open_data(path) as raw:
        # bad bytes become U+FFFD and are counted (read_table reports them)
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="hybridstack_count", newline="")
        try:
            yield text
        finally:
            text.detach()  # open_data closes the underlying stream


def read_head_bytes(path: str | Path, n_bytes: int = HEAD_BYTES) -> bytes:
    """The first ``n_bytes`` of the decompressed data (fewer when the data is shorter)."""
    with open_data(path) as fh:
        return fh.read(n_bytes)


def read_text_head(path: str | Path, n_bytes: int = HEAD_BYTES) -> str:
    """The first ``n_bytes`` of the decompressed data as text (BOM dropped, bad bytes replaced).

    Cheap for a 1 GB ``train.csv.zip``: only the head is decompressed. A multi-byte
    character cut at the end is dropped rather than replaced.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    return decoder.decode(read_head_bytes(path, n_bytes), final=False)


def read_first_line(path: str | Path, max_bytes: int = 1 << 20) -> str:
    """The first line of the decompressed text, newline included (like ``readline``).

    Reads at most ``max_bytes`` (a longer line comes back cut); "" for an empty file.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    head = bytearray()
    with open_data(path) as fh:
        while len(head) < max_bytes:
            block = fh.read(min(HEAD_BYTES, max_bytes - len(head)))
            if not block:
                break
            start = max(len(head) - 1, 0)
            head += block
            if head.find(b"\n", start) >= 0:
                break
    end = head.find(b"\n")
    line = bytes(head if end < 0 else head[:end + 1])
    return decoder.decode(line, final=end >= 0 or len(head) < max_bytes)


def _inner_name(path: Path) -> Path:
    """The name whose extension tells the delimiter: ``path`` itself, except for a zip
    without an inner extension in its own name (``train.zip``): its member's name."""
    if compression_of(path) != "zip" or data_suffix(path):
        return path
    try:
        with zipfile.ZipFile(path) as archive:
            return Path(_zip_member(archive, path).filename)
    except _BROKEN as err:
        raise _broken(path, err) from None


# -- reading -----------------------------------------------------------------------------


def guess_delimiter(path: Path, first_line: str) -> str:
    """Tab for ``.tsv``/``.tab`` (also inside ``.zip``/``.gz``), else sniffed from the header."""
    if data_suffix(path) in (".tsv", ".tab"):
        return "\t"
    if "\t" in first_line and "," not in first_line:
        return "\t"
    return ","


def iter_table(
    path: str | Path,
    delimiter: str | None = None,
    column_names: list[str] | None = None,
    *,
    chunk_rows: int | None = None,
    nrows: int | None = None,
    names_from: str = "data.column_names",
    hint: str = "check data.delimiter",
) -> Iterator[pd.DataFrame]:
    """The one CSV/TSV parser: every cell a ``str``, missing cells "" (NaN text is kept as ""
    and counted later, never the string "nan").

    Reads plain, ``.zip`` and ``.gz`` files as a stream (see :func:`open_data`); the header
    is the first line unless ``column_names`` (which ``names_from`` names in errors) name
    every field; the delimiter is given or follows the (inner) file name or the header.
    Yields the whole table as one frame, or chunks of ``chunk_rows`` rows; at most ``nrows``.
    A file without rows, or one pandas cannot parse, is one error line ending in ``hint``.
    """
    path = Path(path)
    try:
        first_line = read_first_line(path)
    except FileNotFoundError:
        raise HybridstackError(f"file not found: {path} (check the path in the config)") from None
    except OSError as err:
        raise HybridstackError(f"cannot read {path}: {err.strerror}") from None
    if not first_line.strip():
        raise HybridstackError(f"{path} is empty or starts with a blank line: it needs a header "
                               "line and at least one row")
    sep = delimiter or guess_delimiter(_inner_name(path), first_line)
    n_rows = 0
    try:
        with open_text(path) as fh:
            parsed = pd.read_csv(fh, sep=sep, dtype=str, keep_default_na=False,
                                 header=None if column_names else "infer",
                                 chunksize=chunk_rows, nrows=nrows)
            # the chunk reader reads from fh, which open_text closes
            for frame in [parsed] if chunk_rows is None else parsed:
                n_rows += len(frame)
                yield _named_columns(frame, path, column_names, names_from)
    except pd.errors.EmptyDataError:
        raise HybridstackError(f"{path} has no rows") from None
    except (pd.errors.ParserError, ValueError) as err:
        raise HybridstackError(
            f"{path}: cannot parse as delimited text ({one_line(err)}); {hint}") from None
    if n_rows == 0:
        raise HybridstackError(f"{path} has a header but no rows")


def _named_columns(frame: pd.DataFrame, path: Path, column_names: list[str] | None,
                   names_from: str) -> pd.DataFrame:
    if column_names is not None and len(column_names) < frame.shape[1]:
        raise HybridstackError(f"{path.name} has {frame.shape[1]} fields per row but {names_from} "
                               f"names {len(column_names)}; name every field")
    # fewer fields than names: the trailing named columns are absent (a test file has no labels)
    names = column_names[:frame.shape[1]] if column_names else frame.columns
    frame.columns = [str(c).strip() for c in names]
    return frame


def read_table(
    path: str | Path,
    delimiter: str | None = None,
    column_names: list[str] | None = None,
) -> Table:
    """The whole table (see :func:`iter_table`), and how many bytes were not valid UTF-8."""
    path = Path(path)
    _counter.count = 0
    (frame,) = iter_table(path, delimiter, column_names)
    n_bad = _counter.count
    if n_bad:
        log.warning("%s: %d bytes were not valid UTF-8 and were replaced with U+FFFD", path.name, n_bad)
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
    """The SHA-256 of the file as stored (a ``.zip``/``.gz`` is hashed compressed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
