import json

import numpy as np
import pandas as pd
import pytest

from hybridstack.config import CleanConfig, TaskConfig
from hybridstack.errors import HybridstackError
from hybridstack.tables import read_table
from hybridstack.tasks import (
    MulticlassTask,
    MultilabelTask,
    PairwiseTask,
    mean_column_auc,
    multiclass_log_loss,
)
from hybridstack.text import clean_text


def _table(tmp_path, frame: pd.DataFrame, name="train.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return read_table(path)


def _pairwise_frame(prompt='["hi"]', a='["x"]', b='["y"]', winners=(1, 0, 0), n=1):
    return pd.DataFrame({
        "id": [str(i) for i in range(n)], "model_a": "m1", "model_b": "m2",
        "prompt": [prompt] * n, "response_a": [a] * n, "response_b": [b] * n,
        "winner_model_a": [winners[0]] * n, "winner_model_b": [winners[1]] * n,
        "winner_tie": [winners[2]] * n,
    })


def test_pairwise_joins_turns_and_nulls(tmp_path):
    task = PairwiseTask(TaskConfig(kind="pairwise"), CleanConfig())
    frame = _pairwise_frame(prompt=json.dumps(["first q", "second q"]),
                            a=json.dumps(["answer one", None]), b=json.dumps([None]))
    ds = task.parse(_table(tmp_path, frame), labelled=True)
    assert ds.fields["prompt"] == ["first q\n\nsecond q"]
    assert ds.fields["response_a"] == ["answer one"]  # null turn is empty, trailing blanks cleaned
    assert ds.fields["response_b"] == [""]
    assert ds.Y.tolist() == [[1, 0, 0]]
    assert ds.groups.tolist() == ["first q\n\nsecond q"]
    assert "model_a" not in ds.fields  # model names are never features


def test_pairwise_malformed_json(tmp_path):
    task = PairwiseTask(TaskConfig(kind="pairwise"), CleanConfig())
    frame = _pairwise_frame(a='["unterminated')
    with pytest.raises(HybridstackError, match=r"id 0: 'response_a' is not valid JSON"):
        task.parse(_table(tmp_path, frame), labelled=True)


def test_pairwise_winner_not_one_hot(tmp_path):
    task = PairwiseTask(TaskConfig(kind="pairwise"), CleanConfig())
    with pytest.raises(HybridstackError, match="not one-hot"):
        task.parse(_table(tmp_path, _pairwise_frame(winners=(1, 1, 0))), labelled=True)


def test_multilabel_labels_outside_01(tmp_path):
    task = MultilabelTask(TaskConfig(kind="multilabel", text_columns=["comment_text"],
                                     label_columns=["a", "b"]), CleanConfig())
    frame = pd.DataFrame({"id": ["1", "2"], "comment_text": ["x", "y"], "a": [0, 2], "b": [1, 0]})
    with pytest.raises(HybridstackError, match=r"column 'a' must hold 0 or 1"):
        task.parse(_table(tmp_path, frame), labelled=True)


def test_duplicate_ids(tmp_path):
    task = MultilabelTask(TaskConfig(kind="multilabel", text_columns=["t"], label_columns=["a"]),
                          CleanConfig())
    frame = pd.DataFrame({"id": ["1", "1"], "t": ["x", "y"], "a": [0, 1]})
    with pytest.raises(HybridstackError, match="duplicate ids"):
        task.parse(_table(tmp_path, frame), labelled=True)


def test_missing_column_and_wrong_delimiter(tmp_path):
    task = MulticlassTask(TaskConfig(kind="multiclass"), CleanConfig())
    path = tmp_path / "train.csv"
    path.write_text("id\ttext\tlabel\n1\thello\tx\n")  # a TSV named .csv
    with pytest.raises(HybridstackError, match=r"missing column.*wrong delimiter\? set data.delimiter"):
        task.parse(read_table(path, delimiter=","), labelled=True)


def test_empty_and_nan_text_kept_and_counted(tmp_path):
    task = MulticlassTask(TaskConfig(kind="multiclass"), CleanConfig())
    path = tmp_path / "train.csv"
    path.write_text("id,text,label\n1,,a\n2,hello,b\n3,   ,a\n")
    ds = task.parse(read_table(path), labelled=True)
    assert ds.fields["text"] == ["", "hello", ""]
    assert ds.stats["empty_text"] == 2


def test_multiclass_classes_any_dtype_and_unknown_labels(tmp_path):
    task = MulticlassTask(TaskConfig(kind="multiclass"), CleanConfig())
    frame = pd.DataFrame({"id": [1, 2, 3, 4], "text": ["a", "b", "c", "d"], "label": [10, 2, 2, 10]})
    ds = task.parse(_table(tmp_path, frame), labelled=True)
    assert task.label_names == ["2", "10"]  # numeric labels sorted numerically
    assert ds.Y.argmax(1).tolist() == [1, 0, 0, 1]
    other = pd.DataFrame({"id": [5], "text": ["e"], "label": [7]})
    with pytest.raises(HybridstackError, match="labels outside the class set"):
        task.parse(_table(tmp_path, other, "b.csv"), labelled=True)


def test_non_utf8_bytes_replaced_and_counted(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"id,text,label\n1,caf\xe9 ok,a\n2,fine,b\n")
    table = read_table(path)
    assert table.n_bad_bytes == 1
    assert table.frame["text"][0] == "caf\ufffd ok"


def test_empty_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("")
    with pytest.raises(HybridstackError, match="is empty"):
        read_table(path)


def test_cleaning_steps():
    cfg = CleanConfig(lowercase=True, remove_urls=True, remove_non_ascii=True, normalize_whitespace=True)
    assert clean_text("Visit  HTTPS://x.org/a?b  now\t\u00e9t\u00e9 OK", cfg) == "visit now t ok"
    assert clean_text("a\n\n\n\nb", CleanConfig()) == "a\n\nb"
    assert clean_text("Keep CAPS www.site.com", CleanConfig(remove_urls=False)) == "Keep CAPS www.site.com"


def test_metrics():
    Y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    assert multiclass_log_loss(Y, np.full((4, 3), 1 / 3)) == pytest.approx(np.log(3))
    assert multiclass_log_loss(Y, Y) < 1e-5
    Ym = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], dtype=np.float32)
    assert mean_column_auc(Ym, Ym) == 1.0
    # a label with a single class is skipped, as on Kaggle
    Ym2 = np.array([[1, 0], [0, 0]], dtype=np.float32)
    assert mean_column_auc(Ym2, np.array([[0.9, 0.1], [0.1, 0.2]])) == 1.0


def test_submission_validator(tmp_path):
    task = PairwiseTask(TaskConfig(kind="pairwise"), CleanConfig())
    ids = np.array(["1", "2"])
    sample = pd.DataFrame({"id": ["2", "1"], "winner_model_a": 0.3, "winner_model_b": 0.3,
                           "winner_tie": 0.4})
    good = np.array([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]], dtype=np.float32)
    sub = task.submission_frame(ids, good, sample)
    assert sub["id"].tolist() == ["2", "1"]  # the sample's order
    assert sub.iloc[0, 1:].tolist() == pytest.approx([0.6, 0.2, 0.2])
    task.validate_submission(sub, sample, ids)
    bad_sum = task.submission_frame(ids, good * 0.5, sample)
    with pytest.raises(HybridstackError, match="sum to 1"):
        task.validate_submission(bad_sum, sample, ids)
    nan = sub.copy()
    nan.iloc[0, 1] = np.nan
    with pytest.raises(HybridstackError, match="NaN"):
        task.validate_submission(nan, sample, ids)
    out_of_range = sub.copy()
    out_of_range.iloc[0, 1] = 1.5
    with pytest.raises(HybridstackError, match="outside"):
        task.validate_submission(out_of_range, sample, ids)
    with pytest.raises(HybridstackError, match="ids do not match"):
        task.validate_submission(sub.iloc[:1], sample, ids)


def test_multiclass_single_column_submission():
    task = MulticlassTask(TaskConfig(kind="multiclass"), CleanConfig(), classes=["neg", "pos"])
    sample = pd.DataFrame({"id": ["a", "b"], "label": [0.5, 0.5]})
    sub = task.submission_frame(np.array(["b", "a"]), np.array([[0.1, 0.9], [0.7, 0.3]]), sample)
    assert sub["label"].tolist() == pytest.approx([0.3, 0.9])  # binary: P(positive), sample order
    three = MulticlassTask(TaskConfig(kind="multiclass"), CleanConfig(), classes=["x", "y", "z"])
    sub3 = three.submission_frame(np.array(["a", "b"]), np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]),
                                  sample)
    assert sub3["label"].tolist() == ["y", "x"]


def test_missing_id_column_uses_row_number(tmp_path):
    task = MulticlassTask(TaskConfig(kind="multiclass"), CleanConfig())
    path = tmp_path / "train.csv"
    path.write_text("text,label\nhello,a\nworld,b\n")
    ds = task.parse(read_table(path), labelled=True)
    assert ds.ids.tolist() == ["0", "1"]


def _binary(classes, positive_label=None):
    from hybridstack.config import CleanConfig, TaskConfig
    from hybridstack.tasks import MulticlassTask

    return MulticlassTask(TaskConfig(kind="multiclass", positive_label=positive_label),
                          CleanConfig(), classes=classes)


def _one_column_submission(task, column):
    sample = pd.DataFrame({"id": ["a", "b"], column: [0.5, 0.5]})
    P = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    return task.submission_frame(np.array(["a", "b"]), P, sample)[column].tolist()


def test_a_one_column_binary_submission_holds_the_positive_class():
    # sorted classes: the second is not always the positive one
    assert _one_column_submission(_binary(["0", "1"]), "target") == pytest.approx([0.1, 0.8])
    assert _one_column_submission(_binary(["False", "True"]), "y") == pytest.approx([0.1, 0.8])
    assert _one_column_submission(_binary(["ham", "spam"]), "ham") == pytest.approx([0.9, 0.2])
    assert _one_column_submission(_binary(["ham", "spam"], "ham"), "target") == pytest.approx(
        [0.9, 0.2])
    with pytest.raises(HybridstackError, match="set task.positive_label") as err:
        _one_column_submission(_binary(["ham", "spam"]), "target")
    assert "\n" not in str(err.value)
    with pytest.raises(HybridstackError, match="is not one of the classes"):
        _one_column_submission(_binary(["ham", "spam"], "eggs"), "target")
