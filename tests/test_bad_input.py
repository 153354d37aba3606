"""Bad input through the CLI, table-driven: refused as one line, or tolerated and counted.

Extends the cases of tests/test_cli.py (missing label column, labels outside 0/1, duplicate
train ids, malformed JSON, winners with two ones, a changed test id, an unknown tfidf key,
a missing config file, a changed train file) with the rest of the matrix.

Refused cases run after a finished tfidf run and prove, byte for byte, that every earlier
file under the workdir is untouched. Tolerated cases (odd bytes, empty text, huge text)
finish with exit 0 and count what they met in dataset.json.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
from conftest import FAST, _merge

from hybridstack.cli import main
from hybridstack.runs import ExperimentDir, write_npy
from hybridstack.synthetic import write_competition

EXIT_USER_ERROR = 2


def write_project(root: Path, kind: str, **sections) -> Path:
    """A competition under root/data and root/cfg.toml with paths relative to it (copyable)."""
    competition = write_competition(root / "data", kind, 60, 12)
    raw = _merge(_merge(FAST, {"task": competition["task"]}), sections)
    raw["data"] = {"train": "data/train.csv", "test": "data/test.csv",
                   "sample_submission": "data/sample_submission.csv"}
    raw.update(experiment="bad", workdir="work")
    path = root / "cfg.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Callable[[str], Path]:
    """``finished(kind)``: a project folder after `run tfidf`, built once per kind per module."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            root = tmp_path_factory.mktemp(f"finished_{kind}")
            assert main(["run", "tfidf", "-c", str(write_project(root, kind))]) == 0
            built[kind] = root
        return built[kind]

    return get


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def edit_csv(path: Path, change: Callable[[pd.DataFrame], pd.DataFrame | None]) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    changed = change(frame)
    (frame if changed is None else changed).to_csv(path, index=False)


def set_cell(column: str, value: str, row: int = 0) -> Callable[[pd.DataFrame], None]:
    return lambda frame: frame.loc.__setitem__((row, column), value)


def on(file: str, change) -> Callable[[Path], list[str]]:
    """A breakage that edits data/<file> and runs the same command."""
    def apply(root: Path) -> list[str]:
        edit_csv(root / "data" / file, change)
        return []
    return apply


def overrides(*items: str) -> Callable[[Path], list[str]]:
    return lambda root: [arg for item in items for arg in ("--set", item)]


def rewrite(file: str, content: bytes) -> Callable[[Path], list[str]]:
    def apply(root: Path) -> list[str]:
        (root / file).write_bytes(content)
        return []
    return apply


def semicolons(root: Path) -> list[str]:
    path = root / "data" / "train.csv"
    pd.read_csv(path).to_csv(path, sep=";", index=False)
    return []


def delete_train(root: Path) -> list[str]:
    (root / "data" / "train.csv").unlink()
    return []


def short_folds(root: Path) -> list[str]:
    folds = root / "work" / "runs" / "bad" / "folds.npy"
    write_npy(folds, np.load(folds)[:-1])
    return []


@dataclass(frozen=True)
class Refused:
    name: str
    kind: str
    breaks: Callable[[Path], list[str]]  # edits the project, returns extra CLI arguments
    message: str
    exit_code: int = EXIT_USER_ERROR


REFUSED = [
    # files
    Refused("missing train file", "multiclass", delete_train, "data.train: file not found"),
    Refused("empty train file", "multiclass", rewrite("data/train.csv", b""), "train.csv is empty"),
    Refused("header-only test file", "multiclass", rewrite("data/test.csv", b"id,text\n"),
            "test.csv has a header but no rows"),
    Refused("test file without the text column", "multiclass",
            on("test.csv", lambda f: f.drop(columns=["text"])), "test.csv: missing column(s) 'text'"),
    Refused("wrong delimiter", "multiclass", semicolons, "wrong delimiter? set data.delimiter"),
    # pairwise JSON and winners
    Refused("prompt is a JSON object", "pairwise", on("train.csv", set_cell("prompt", '{"turn": 1}')),
            "'prompt' must be a JSON list of turns, got dict"),
    Refused("test response is not JSON", "pairwise", on("test.csv", set_cell("response_b", "[unquoted]")),
            "'response_b' is not valid JSON"),
    Refused("winner columns all zero", "pairwise",
            on("train.csv", lambda f: f.loc.__setitem__((0, ["winner_model_a", "winner_model_b",
                                                              "winner_tie"]), "0")),
            "winner columns that are not one-hot"),
    Refused("winner column not a number", "pairwise", on("train.csv", set_cell("winner_tie", "yes")),
            "column 'winner_tie' must hold 0 or 1"),
    # labels
    Refused("multilabel label missing", "multilabel", on("train.csv", set_cell("threat", "")),
            "column 'threat' must hold 0 or 1"),
    Refused("multiclass empty label", "multiclass", on("train.csv", set_cell("label", " ")),
            "rows have an empty label in 'label'"),
    Refused("multiclass single class", "multiclass",
            on("train.csv", lambda f: f.assign(label="sports")), "has a single class"),
    Refused("sample columns are not the classes", "multiclass",
            on("sample_submission.csv", lambda f: f.assign(extra="0")),
            "are neither the class names"),
    Refused("sample with an extra column", "pairwise",
            on("sample_submission.csv", lambda f: f.assign(extra="0")), "are not the id column 'id'"),
    # ids
    Refused("duplicate test ids", "multiclass", on("test.csv", set_cell("id", "mc60", row=1)),
            "test.csv: 1 duplicate ids in column 'id'"),
    Refused("sample has an id the test lacks", "multilabel",
            on("sample_submission.csv", lambda f: pd.concat([f, f.iloc[:1].assign(id="ghost")])),
            "0 test ids not in it, 1 sample ids not in test"),
    Refused("sample without the id column", "multilabel",
            on("sample_submission.csv", lambda f: f.rename(columns={"id": "row"})),
            "sample_submission.csv has no id column 'id'"),
    # config
    Refused("misspelt section", "multiclass", overrides("fintune.lr=1e-3"), "unknown config key 'fintune'"),
    Refused("misspelt key in a table array", "multiclass", overrides("embed.lgbm.0.num_leafs=7"),
            "unknown config key 'embed.lgbm.0.num_leafs'"),
    Refused("wrong type", "multiclass", overrides("cv.n_splits=five"), "config key 'cv.n_splits'"),
    Refused("out of range", "multiclass", overrides("cv.n_splits=1"), "config key 'cv.n_splits'"),
    Refused("override without '='", "multiclass", overrides("cv.seed"), "expected section.key=value"),
    Refused("invalid TOML", "multiclass", rewrite("cfg.toml", b"[cv\nn_splits = 3\n"), "invalid TOML"),
    # the experiment folder was made by another config or dataset
    Refused("other cv seed", "multiclass", overrides("cv.seed=7"), "made from different inputs (changed: cv)"),
    Refused("other cleaning", "multiclass", overrides("data.clean.lowercase=true"),
            "made from different inputs (changed: clean)"),
    Refused("other text columns", "multiclass", overrides("task.text_columns=['text','text']"),
            "made from different inputs (changed: task)"),
    Refused("folds.npy of another dataset", "multiclass", short_folds, "folds.npy has 59 rows but train has 60"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_refused_as_one_line_and_earlier_files_untouched(finished, tmp_path, capsys, case):
    root = tmp_path / "project"
    shutil.copytree(finished(case.kind), root)
    # a no-op re-run (everything DONE) records the copy's own paths in dataset.json
    assert main(["run", "tfidf", "-c", str(root / "cfg.toml")]) == 0
    extra = case.breaks(root)
    before = snapshot(root / "work")
    capsys.readouterr()
    code = main(["run", "tfidf", "-c", str(root / "cfg.toml"), *extra,
                 "--set", "tfidf.models=[{name='other'}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == case.exit_code
    assert len(err) == 1 and err[0].startswith("error: ") and case.message in err[0], err
    assert snapshot(root / "work") == before


@pytest.mark.parametrize("section, message", [
    ({"embed": {"enabled": True, "model": "./no_such_encoder"}}, "embed.model: model folder not found"),
    ({"finetune": {"enabled": True, "model": "./no_such_model"}}, "finetune.model: model folder not found"),
], ids=["embed.model", "finetune.model"])
def test_missing_model_folder_is_one_line_and_earlier_files_untouched(tmp_path, capsys, section, message):
    stage = next(iter(section))
    path = write_project(tmp_path, "multiclass", **section)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    before = snapshot(tmp_path / "work")
    capsys.readouterr()
    assert main(["run", stage, "-c", str(path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "no_such" in err[0], err
    assert snapshot(tmp_path / "work") == before


# -- tolerated: exit 0, counted -----------------------------------------------------------------

BAD_BYTES = b"caf\xe9 \xff"  # Latin-1 e-acute and a stray 0xFF: two invalid UTF-8 bytes


def latin1_bytes(root: Path) -> list[str]:
    path = root / "data" / "train.csv"
    lines = path.read_bytes().split(b"\n")
    for i in (1, 2, 3):  # inside the text of three rows
        lines[i] = lines[i].replace(b",", b"," + BAD_BYTES + b" ", 1)
    path.write_bytes(b"\n".join(lines))
    return []


def empty_texts(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[0:1, "text"] = ""
    frame.loc[2, "text"] = "   \n "
    frame.loc[3, "text"] = np.nan  # written as an empty cell
    return frame


def megabyte_text(frame: pd.DataFrame) -> None:
    words = " ".join(["match goal team"] * 70_000)  # ~1 MB
    frame.loc[0, "text"] = words[:1_000_000]


@dataclass(frozen=True)
class Tolerated:
    name: str
    breaks: Callable[[Path], list[str]]
    stats: dict[str, int]  # expected dataset.json train_stats entries


TOLERATED = [
    Tolerated("non-UTF-8 bytes", latin1_bytes, {"bad_bytes": 6, "empty_text": 0}),
    Tolerated("empty and NaN texts", on("train.csv", empty_texts), {"empty_text": 4, "bad_bytes": 0}),
    Tolerated("1 MB text", on("train.csv", megabyte_text), {"empty_text": 0, "bad_bytes": 0}),
]


@pytest.mark.parametrize("case", TOLERATED, ids=[c.name for c in TOLERATED])
def test_tolerated_input_runs_and_is_counted(tmp_path, case):
    path = write_project(tmp_path, "multiclass")
    case.breaks(tmp_path)
    assert main(["run", "tfidf", "-c", str(path)]) == 0
    exp = ExperimentDir(tmp_path / "work" / "runs" / "bad")
    stats = json.loads(exp.dataset_path.read_text())["train_stats"]
    assert {k: stats[k] for k in case.stats} == case.stats
    oof = exp.model("tfidf_logreg").load_oof()
    assert oof.shape == (60, 3) and not np.isnan(oof).any()
    assert exp.submission_path.is_file()
