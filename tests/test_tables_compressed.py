"""Compressed tables (.zip/.gz of a CSV or TSV) read like the plain file they hold."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from hybridstack.errors import HybridstackError
from hybridstack.tables import (
    data_suffix,
    file_sha256,
    guess_delimiter,
    open_text,
    read_first_line,
    read_table,
    read_text_head,
    table_file_names,
)

FRAME = pd.DataFrame({"id": ["a1", "a2", "a3"],
                      "comment_text": ["hello, world", "caf\u00e9 \"quoted\"", "multi\nline"],
                      "toxic": ["0", "1", "0"]})


def _plain(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"train{suffix}"
    FRAME.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
@pytest.mark.parametrize("kind", ["zip", "gz"])
def test_compressed_reads_equal_to_the_plain_file(tmp_path, suffix, kind):
    plain = _plain(tmp_path, suffix)
    packed = tmp_path / "packed" / f"{plain.name}.{kind}"
    packed.parent.mkdir()
    if kind == "zip":
        _zip(packed, {"__MACOSX/._train": b"junk", "folder/": b"", plain.name: plain.read_bytes()})
    else:
        packed.write_bytes(gzip.compress(plain.read_bytes()))
    expected = read_table(plain).frame
    pd.testing.assert_frame_equal(expected, FRAME)
    table = read_table(packed)
    pd.testing.assert_frame_equal(table.frame, expected)
    assert table.path == packed and table.n_bad_bytes == 0
    assert data_suffix(packed) == suffix
    assert guess_delimiter(packed, "") == ("\t" if suffix == ".tsv" else ",")
    assert read_first_line(packed) == read_first_line(plain) == plain.read_text().split("\n")[0] + "\n"
    assert read_text_head(packed, 10) == plain.read_text()[:10]
    with open_text(packed) as fh:
        pd.testing.assert_frame_equal(pd.read_csv(fh, sep=guess_delimiter(packed, ""), dtype=str), expected)
    assert file_sha256(packed) != file_sha256(plain)  # hashed as stored


def test_a_zip_named_without_inner_extension_uses_the_member_name(tmp_path):
    plain = _plain(tmp_path, ".tsv")
    packed = _zip(tmp_path / "train.zip", {"train.tsv": plain.read_bytes()})
    pd.testing.assert_frame_equal(read_table(packed).frame, FRAME)


def test_bad_bytes_are_counted_inside_a_gzip(tmp_path):
    path = tmp_path / "train.csv.gz"
    path.write_bytes(gzip.compress(b"id,text\n1,caf\xe9\n"))
    table = read_table(path)
    assert table.n_bad_bytes == 1 and table.frame["text"].tolist() == ["caf\ufffd"]


def test_a_zip_with_several_members_is_a_one_line_error(tmp_path):
    path = _zip(tmp_path / "train.csv.zip", {"train.csv": b"id\n1\n", "extra\nname.csv": b"id\n2\n"})
    for call in (read_table, read_first_line):
        with pytest.raises(HybridstackError) as err:
            call(path)
        message = str(err.value)
        assert "\n" not in message
        assert "2 files" in message and "'train.csv'" in message and str(path) in message


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(b"id,text\n1,a\n" * 100)[:40],
                                     b"\x1f\x8b\x08\x00" + b"\xff" * 40])
def test_a_corrupt_gzip_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "train.csv.gz"
    path.write_bytes(content)
    with pytest.raises(HybridstackError) as err:
        read_table(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "corrupt" in message


def test_a_corrupt_zip_is_a_one_line_error(tmp_path):
    path = tmp_path / "train.csv.zip"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(HybridstackError) as err:
        read_table(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_compressed_file_is_the_usual_error(tmp_path):
    with pytest.raises(HybridstackError, match="file not found"):
        read_table(tmp_path / "train.csv.zip")


def test_data_suffix_and_table_names():
    assert data_suffix("a/x.CSV.ZIP") == ".csv" and data_suffix("x.tsv") == ".tsv"
    assert data_suffix("x.zip") == ""
    assert table_file_names("train") == ("train.csv", "train.tsv", "train.csv.zip", "train.csv.gz",
                                         "train.tsv.zip", "train.tsv.gz")
