import errno
import os

import numpy as np
import pytest

from hybridstack.errors import HybridstackError
from hybridstack.runs import ExperimentDir, atomic_path, write_json, write_npy, write_text


def test_crash_during_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "oof.npy"
    write_npy(target, np.zeros(3))
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("killed mid-write")
    assert np.array_equal(np.load(target), np.zeros(3))  # the old complete file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oof.npy"]  # no temp left behind


def test_crash_before_first_write_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "scores.json"
    with pytest.raises(KeyError), atomic_path(target):
        raise KeyError("boom")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_done_marker_tracks_config_hash(tmp_path):
    model = ExperimentDir(tmp_path).model("m")
    assert not model.is_done()
    write_json(model.scores_path, {"overall": 1.0})
    model.mark_done("abc")
    assert model.is_done("abc") and not model.is_done("other")
    assert [m.name for m in ExperimentDir(tmp_path).finished_models()] == ["m"]
    model.clear_done()
    assert ExperimentDir(tmp_path).finished_models() == []


@pytest.mark.parametrize("code, message", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk full")])
def test_disk_errors_are_one_clear_line(tmp_path, monkeypatch, code, message):
    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(HybridstackError, match=message) as info:
        write_text(tmp_path / "x.txt", "hi")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the temp file is cleaned up too
