"""The one CSV/TSV parser every reader uses: whole, head and chunks agree."""

import gzip

import pandas as pd
import pytest

from hybridstack.errors import HybridstackError
from hybridstack.tables import iter_table, read_table


@pytest.fixture
def table(tmp_path):
    frame = pd.DataFrame({"id": [str(i) for i in range(23)],
                          "text": [f"row {i}, with a comma" if i % 5 else "" for i in range(23)]})
    path = tmp_path / "rows.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        frame.to_csv(fh, index=False)
    return path, frame


def test_chunks_head_and_whole_table_are_the_same_rows(table):
    path, frame = table
    whole = read_table(path).frame
    pd.testing.assert_frame_equal(whole, frame)
    assert (whole["text"] == "").sum() == 5  # missing cells stay "", never "nan"
    chunks = list(iter_table(path, chunk_rows=10))
    assert [len(c) for c in chunks] == [10, 10, 3]
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), frame)
    (head,) = iter_table(path, nrows=4)
    pd.testing.assert_frame_equal(head, frame.head(4))


def test_column_names_for_a_headerless_file(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text("1\thello\tyes\n2\tworld\tno\n")
    assert read_table(path, column_names=["id", "text", "label"]).frame["label"].tolist() == ["yes", "no"]
    # a test file without the trailing label column
    assert list(read_table(path, column_names=["id", "text", "label", "extra"]).frame.columns) == [
        "id", "text", "label"]
    with pytest.raises(HybridstackError, match="3 fields per row but data.column_names names 2"):
        read_table(path, column_names=["id", "text"])  # pandas would make the id an index


def test_header_only_and_bad_bytes(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,text\n")
    with pytest.raises(HybridstackError, match="has a header but no rows"):
        read_table(path)
    with pytest.raises(HybridstackError, match="has a header but no rows"):
        list(iter_table(path, chunk_rows=5))
    path.write_bytes(b"id,text\n1,caf\xe9\n")
    table = read_table(path)
    assert table.n_bad_bytes == 1 and table.frame["text"].tolist() == ["caf\ufffd"]
