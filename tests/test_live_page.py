"""``hybridstack ui``: the Streamlit page through AppTest (type a text, see the labels and
the explanation; a second text loads nothing; upload a CSV, download the predictions; the
leaderboard with held-out scores and the report plots) and, marked slow, in a real
headless Chromium (Debian's chromium + chromium-driver, driven by selenium)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import tomli_w

pytest.importorskip("streamlit", reason="the ui extra is not installed: pip install 'hybridstack[ui]'")

import streamlit as st  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402
from streamlit.testing.v1 import app_test as app_test_module  # noqa: E402

from hybridstack.cli import main as cli_main  # noqa: E402
from hybridstack.commands.run import run_stage  # noqa: E402
from hybridstack.commands.score import score_submission  # noqa: E402
from hybridstack.live import core  # noqa: E402
from hybridstack.live.commands import PAGE  # noqa: E402
from hybridstack.synthetic import multilabel_frame, write_competition  # noqa: E402

N_TRAIN, N_TEST = 120, 30
TFIDF = {"max_word_features": 2000, "max_char_features": 4000, "min_df": 1,
         "models": [{"name": "lr_a", "C": 1.0}, {"name": "lr_b", "C": 10.0}]}
TOXIC_TEXT = "You stupid idiot, you are a moron and a fool."
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def build_run(root: Path, kind: str, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """A synthetic competition through tfidf (two LR models), a weighted stack and the report."""
    from hybridstack.commands.report import write_report

    raw = write_competition(root / "data", kind, n_train=n_train, n_test=n_test)
    raw.update({"experiment": f"page_{kind}", "workdir": str(root / "work"),
                "cv": {"n_splits": 3}, "tfidf": TFIDF, "embed": {"enabled": False},
                "finetune": {"enabled": False}, "stack": {"methods": ["weighted"]}})
    config = root / f"{kind}.toml"
    config.write_text(tomli_w.dumps(raw))
    for stage in ("tfidf", "stack"):
        run_stage(stage, str(config), [])
    run_dir = root / "work" / "runs" / raw["experiment"]
    write_report(run_dir)
    return run_dir


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("page_multilabel"), "multilabel")


@pytest.fixture(scope="module")
def test_labels(multilabel_run) -> Path:
    """The synthetic test rows' labels (the generator is seeded: regenerate them)."""
    full = multilabel_frame(N_TRAIN + N_TEST, seed=0)
    path = multilabel_run.parent.parent.parent / "test_labels.csv"
    full.iloc[N_TRAIN:].drop(columns=["comment_text"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def pairwise_run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("page_pairwise"), "pairwise", n_train=90, n_test=20)


@pytest.fixture
def media_files(monkeypatch) -> list:
    """The in-memory media stores AppTest creates (download buttons keep their bytes there)."""
    stores = []

    class Recording(app_test_module.MemoryMediaFileStorage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", Recording)
    return stores


def open_page(monkeypatch, run_dir: Path, *extra: str) -> AppTest:
    """The page as ``hybridstack ui run_dir ...`` starts it, with empty Streamlit caches."""
    st.cache_resource.clear()
    st.cache_data.clear()
    monkeypatch.setattr(sys, "argv", [str(PAGE), str(run_dir), *extra])
    at = AppTest.from_file(str(PAGE), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def predict_text(at: AppTest, *texts: str) -> AppTest:
    for area, text in zip(at.text_area, texts):
        area.input(text)
    at.button[0].click()  # the form's Predict button
    at.run()
    assert not at.exception, at.exception
    return at


def markdown_html(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def test_typing_a_text_shows_labels_and_why_and_loads_once(monkeypatch, multilabel_run, tmp_path):
    workdir = multilabel_run.parent.parent
    before = folder_digest(workdir)
    loads = core.loads
    at = open_page(monkeypatch, multilabel_run, "--cache-dir", str(tmp_path / "cache"))
    assert core.loads == loads + 1
    assert at.title[0].value == multilabel_run.name
    assert [t.label for t in at.tabs] == ["Predict", "Score a CSV", "Leaderboard"]

    predict_text(at, TOXIC_TEXT)
    assert core.loads == loads + 1  # typing a text loads nothing
    first = at.success[0].value
    page = markdown_html(at)
    ngrams = at.dataframe[0].value
    predict_text(at, "What a lovely sunny day in the park.")
    assert core.loads == loads + 1  # nor does a second text: the predictor is cached
    assert at.success or at.info  # the second text's labels (or none)

    predictor = core.load_predictor(multilabel_run, tmp_path / "cache2")
    expected = predictor.explain([{"comment_text": TOXIC_TEXT}])[0]
    assert expected["labels"], "the toxic text should get a label"
    assert first == f"Labels: {', '.join(expected['labels'])}"
    for name, p in expected["probabilities"].items():  # every label's bar, probability, threshold
        threshold = predictor.thresholds[name]["threshold"]
        assert f"{p:.3f} / {threshold:.3f}" in page
    assert "<mark" in page and "stupid" in page  # the n-grams highlighted in the text
    assert "**Stack**" in page
    assert {"model", "label", "ngram", "contribution"} <= set(ngrams.columns)
    assert set(ngrams["label"]) <= set(expected["labels"])
    assert folder_digest(workdir) == before  # nothing written under the run folder or workdir


def test_uploading_a_csv_scores_it_like_predict_input_output(monkeypatch, multilabel_run, tmp_path,
                                                             media_files):
    test_csv = multilabel_run.parent.parent.parent / "data" / "test.csv"
    at = open_page(monkeypatch, multilabel_run, "--cache-dir", str(tmp_path / "cache"))
    at.file_uploader[0].set_value(("new_rows.csv", test_csv.read_bytes(), "text/csv"))
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert f"Scored {N_TEST:,} rows of new_rows.csv" in [s.value for s in at.success]
    button = at.download_button[0]
    assert button.label == "Download the predictions (CSV)"
    file_id = button.proto.url.rsplit("/", 1)[1]
    downloaded = media_files[-1].get_file(file_id)
    assert downloaded.filename == "new_rows_predictions.csv"

    # the same bytes as `hybridstack predict --input --output`
    out = tmp_path / "cli.csv"
    assert cli_main(["predict", str(multilabel_run), "--input", str(test_csv), "--output",
                     str(out), "--cache-dir", str(tmp_path / "cli-cache")]) == 0
    assert downloaded.content == out.read_bytes()
    frame = pd.read_csv(out)
    assert len(frame) == N_TEST and "pred_toxic" in frame.columns

    # typing afterwards keeps the scored file (it is not scored again)
    predict_text(at, TOXIC_TEXT)
    assert at.download_button[0].proto.url == button.proto.url


def test_score_upload_in_chunks_reports_progress(multilabel_run, tmp_path):
    predictor = core.load_predictor(multilabel_run, tmp_path / "cache")
    test_csv = multilabel_run.parent.parent.parent / "data" / "test.csv"
    seen = []
    frame = core.score_upload(predictor, test_csv.read_bytes(), "t.csv", chunk_rows=7,
                              progress=lambda done, total: seen.append((done, total)))
    assert seen == [(7, 30), (14, 30), (21, 30), (28, 30), (30, 30)]
    whole = predictor.predict_frame(pd.read_csv(test_csv, dtype=str, keep_default_na=False))
    pd.testing.assert_frame_equal(frame, whole)


def test_a_bad_upload_is_one_error_line(monkeypatch, multilabel_run, tmp_path):
    at = open_page(monkeypatch, multilabel_run, "--cache-dir", str(tmp_path / "cache"))
    at.file_uploader[0].set_value(("bad.csv", b"id,wrong_column\n1,hello\n", "text/csv"))
    at.run()
    assert not at.exception
    assert "comment_text" in at.error[0].value
    assert not at.download_button


def test_leaderboard_with_heldout_scores_and_report_plots(monkeypatch, multilabel_run, test_labels,
                                                          tmp_path):
    at = open_page(monkeypatch, multilabel_run, "--cache-dir", str(tmp_path / "cache"),
                   "--labels", str(test_labels))
    board = next(d.value for d in at.dataframe if "rows_validated" in d.value.columns)
    assert set(board["model"]) == {"lr_a", "lr_b", "stack"}
    assert set(board["rows_validated"]) == {N_TRAIN}
    assert (board["metric"] == "mean_roc_auc").all() and "heldout" in board.columns
    stack = board.set_index("model").loc["stack"]
    expected = score_submission(multilabel_run / "submission.csv", test_labels)
    assert stack["heldout"] == pytest.approx(expected.value)
    assert stack["heldout_rows"] == expected.n_rows
    assert stack["cv"] == pytest.approx(
        pd.read_json(multilabel_run / "stack" / "scores.json", typ="series")["overall"])
    plots = sorted((multilabel_run / "report").glob("*.png"))
    assert len(plots) > 0 and len(at.image) == len(plots)
    assert sorted(i.proto.imgs[0].caption for i in at.image) == [p.stem for p in plots]


def test_labels_of_another_test_set_are_a_warning(monkeypatch, multilabel_run, tmp_path):
    other = tmp_path / "other_labels.csv"
    other.write_text("id,toxic,severe_toxic,obscene,threat,insult,identity_hate\nx1,1,0,0,0,0,0\n")
    at = open_page(monkeypatch, multilabel_run, "--cache-dir", str(tmp_path / "cache"),
                   "--labels", str(other))
    assert at.warning[0].value.startswith("No held-out scores: ids differ")
    board = next(d.value for d in at.dataframe if "rows_validated" in d.value.columns)
    assert "heldout" not in board.columns and len(board) == 3


def test_pairwise_page_takes_a_prompt_and_two_responses(monkeypatch, pairwise_run, tmp_path):
    at = open_page(monkeypatch, pairwise_run, "--cache-dir", str(tmp_path / "cache"))
    assert [a.label for a in at.text_area] == ["Prompt", "Response A", "Response B"]
    predict_text(at, "Explain the wiki page?", "A detailed clear answer with steps.", "Dunno.")
    predictor = core.load_predictor(pairwise_run, tmp_path / "cache2")
    P = predictor.predict_proba([{"prompt": ["Explain the wiki page?"],
                                  "response_a": ["A detailed clear answer with steps."],
                                  "response_b": ["Dunno."]}])[0]
    assert at.success[0].value == f"Label: {predictor.label_names[int(P.argmax())]}"
    assert "threshold" not in markdown_html(at).split("**Stack**")[0]  # argmax: no thresholds


def test_an_empty_text_asks_for_one(monkeypatch, multilabel_run, tmp_path):
    at = open_page(monkeypatch, multilabel_run, "--cache-dir", str(tmp_path / "cache"))
    predict_text(at, "   ")
    assert at.warning[0].value == "Type a text first."


# -- a real browser --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ui_command_line(run_dir: Path, port: int, cache_dir: Path) -> list[str]:
    """``hybridstack ui`` (``python -m hybridstack.live ui`` until the CLI registers it)."""
    import argparse

    from hybridstack.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    module = "hybridstack.cli" if "ui" in commands.choices else "hybridstack.live"
    return [sys.executable, "-m", module, "ui", str(run_dir), "--port", str(port),
            "--cache-dir", str(cache_dir)]


def wait_for_health(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"hybridstack ui exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"hybridstack ui did not answer at {url} within {timeout_s}s")


def headless_chromium(user_data_dir: Path, width: int = 1280, height: int = 1000):
    """Debian's chromium through its chromedriver, given explicitly: nothing is fetched."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def type_and_predict(driver, text: str, timeout_s: float = 120) -> str:
    """Type ``text`` into the page's first text box, press Predict, return the page's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout_s)
    area = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea")))
    area.click()
    area.send_keys(text)
    button = next(b for b in driver.find_elements(By.TAG_NAME, "button")
                  if b.text.strip() == "Predict")
    button.click()
    wait.until(lambda d: "Labels:" in d.find_element(By.TAG_NAME, "body").text)
    time.sleep(1.0)  # the bars and tables below the labels finish rendering
    return driver.find_element(By.TAG_NAME, "body").text


def browser_or_skip() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        message = (f"no headless browser: {', '.join(missing)} missing (apt-get install "
                   "chromium chromium-driver)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.slow
def test_the_page_in_a_real_headless_browser(multilabel_run, tmp_path):
    browser_or_skip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    before = folder_digest(multilabel_run.parent.parent)
    proc = subprocess.Popen(ui_command_line(multilabel_run, port, tmp_path / "cache"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    driver = None
    try:
        wait_for_health(url, proc)
        driver = headless_chromium(tmp_path / "chromium-profile")
        driver.get(url)
        text = type_and_predict(driver, TOXIC_TEXT)
        predictor = core.load_predictor(multilabel_run, tmp_path / "cache2")
        labels = predictor.explain([{"comment_text": TOXIC_TEXT}])[0]["labels"]
        assert f"Labels: {', '.join(labels)}" in text
        for name in predictor.label_names:
            assert name in text
        assert "Why" in text
        shot = tmp_path / "ui.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
    assert folder_digest(multilabel_run.parent.parent) == before
