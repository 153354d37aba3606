"""``hybridstack serve``: every route through FastAPI's TestClient, every bad input (422 and
413 naming the field, never a 500 traceback), the micro-batcher, and a real uvicorn server
on 127.0.0.1 under a bounded load test. Tiny tfidf + stack experiments, built in seconds."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'hybridstack[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from hybridstack.commands.run import run_stage  # noqa: E402
from hybridstack.live import core  # noqa: E402
from hybridstack.live.api import create_app  # noqa: E402
from hybridstack.live.batcher import MicroBatcher  # noqa: E402
from hybridstack.live.commands import add_serve_parser, add_ui_parser, main, ui_command  # noqa: E402
from hybridstack.synthetic import multilabel_frame, write_competition  # noqa: E402

ATOL = 1e-5
N_TRAIN, N_TEST = 120, 30
TFIDF = {"max_word_features": 2000, "max_char_features": 4000, "min_df": 1,
         "models": [{"name": "lr_a", "C": 1.0}, {"name": "lr_b", "C": 10.0}]}


def build_run(root: Path, kind: str, n_train: int = N_TRAIN, n_test: int = N_TEST,
              report: bool = False) -> Path:
    """A synthetic competition through tfidf (two LR models) and a weighted stack."""
    raw = write_competition(root / "data", kind, n_train=n_train, n_test=n_test)
    raw.update({"experiment": f"live_{kind}", "workdir": str(root / "work"),
                "cv": {"n_splits": 3}, "tfidf": TFIDF, "embed": {"enabled": False},
                "finetune": {"enabled": False}, "stack": {"methods": ["weighted"]}})
    config = root / f"{kind}.toml"
    config.write_text(tomli_w.dumps(raw))
    for stage in ("tfidf", "stack"):
        run_stage(stage, str(config), [])
    run_dir = root / "work" / "runs" / raw["experiment"]
    if report:
        from hybridstack.commands.report import write_report

        write_report(run_dir)
    return run_dir


def write_test_labels(run_dir: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """The synthetic multilabel test rows' labels (the generator is seeded: regenerate them)."""
    full = multilabel_frame(n_train + n_test, seed=0)
    path = run_dir.parent.parent.parent / "test_labels.csv"
    full.iloc[n_train:].drop(columns=["comment_text"]).to_csv(path, index=False)
    return path


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_test_rows(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir.parent.parent.parent / "data" / "test.csv", dtype=str,
                       keep_default_na=False)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("live_multilabel"), "multilabel")


@pytest.fixture(scope="module")
def pairwise_run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("live_pairwise"), "pairwise", n_train=90, n_test=20)


@pytest.fixture(scope="module")
def multilabel(multilabel_run, tmp_path_factory):
    return core.load_predictor(multilabel_run, tmp_path_factory.mktemp("cache_ml"))


@pytest.fixture(scope="module")
def pairwise(pairwise_run, tmp_path_factory):
    return core.load_predictor(pairwise_run, tmp_path_factory.mktemp("cache_pw"))


@pytest.fixture(scope="module")
def ml_client(multilabel):
    app = create_app(multilabel, max_rows=8, max_chars=200)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def pw_client(pairwise):
    app = create_app(pairwise, max_rows=8, max_chars=200)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


# -- the routes ----------------------------------------------------------------------------------


def test_predict_multilabel_answers_in_order_with_thresholds(ml_client, multilabel, multilabel_run):
    texts = list(read_test_rows(multilabel_run)["comment_text"][:5]) + ["You stupid idiot fool."]
    r = ml_client.post("/predict", json={"rows": [{"comment_text": t, "id": i}
                                                  for i, t in enumerate(texts)]})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    P = multilabel.predict_proba([{"comment_text": t} for t in texts])
    labels = multilabel.predict([{"comment_text": t} for t in texts])
    stored = json.loads((multilabel_run / "stack" / "thresholds.json").read_text())
    assert len(predictions) == len(texts)
    for i, prediction in enumerate(predictions):
        assert list(prediction["probabilities"]) == multilabel.label_names
        np.testing.assert_allclose(list(prediction["probabilities"].values()), P[i], atol=ATOL)
        assert prediction["labels"] == [n for j, n in enumerate(multilabel.label_names)
                                        if labels[i, j]]
        assert prediction["thresholds"] == {n: stored[n]["threshold"] for n in stored}
        assert all(prediction["probabilities"][n] >= prediction["thresholds"][n]
                   for n in prediction["labels"])


def test_predict_pairwise_takes_a_string_or_a_list_of_turns(pw_client, pairwise, pairwise_run):
    test = read_test_rows(pairwise_run).head(3)
    as_lists = [{c: json.loads(row[c]) for c in ("prompt", "response_a", "response_b")}
                for _, row in test.iterrows()]
    r = pw_client.post("/predict", json={"rows": as_lists})
    assert r.status_code == 200, r.text
    P = pairwise.predict_proba(test)
    for i, prediction in enumerate(r.json()["predictions"]):
        np.testing.assert_allclose(list(prediction["probabilities"].values()), P[i], atol=ATOL)
        assert prediction["labels"] == [pairwise.label_names[int(P[i].argmax())]]
        assert prediction["thresholds"] is None
    plain = {"prompt": "Explain wiki?", "response_a": "A detailed clear answer.",
             "response_b": "Dunno."}
    one_turn = {k: [v] for k, v in plain.items()}
    with_null = {**one_turn, "response_b": ["Dunno.", None]}
    r = pw_client.post("/predict", json={"rows": [plain, one_turn, with_null]})
    assert r.status_code == 200, r.text
    got = [list(p["probabilities"].values()) for p in r.json()["predictions"]]
    np.testing.assert_allclose(got[0], got[1], atol=1e-7)  # a string is one turn
    np.testing.assert_allclose(got, pairwise.predict_proba([one_turn, one_turn, with_null]),
                               atol=ATOL)


def test_explain_one_row(ml_client, multilabel):
    r = ml_client.post("/explain", json={"row": {"comment_text": "You stupid idiot fool."},
                                         "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = multilabel.explain([{"comment_text": "You stupid idiot fool."}], top_k=3)[0]
    assert body["labels"] == expected["labels"]
    np.testing.assert_allclose(list(body["probabilities"].values()),
                               list(expected["probabilities"].values()), atol=ATOL)
    assert set(body["stack"]["shares"]) == {"lr_a", "lr_b"}
    assert body["thresholds"] == core.thresholds_of(multilabel)
    for label in body["labels"]:
        entries = body["models"]["lr_a"][label]
        assert 0 < len(entries) <= 3 and {"ngram", "analyzer", "field", "contribution"} <= set(entries[0])


def test_explain_pairwise(pw_client):
    r = pw_client.post("/explain", json={"row": {"prompt": "Explain?", "response_a": ["Yes.", None],
                                                 "response_b": "No."}})
    assert r.status_code == 200, r.text
    assert len(r.json()["labels"]) == 1


def test_health_and_info(ml_client, multilabel, multilabel_run):
    health = ml_client.get("/health").json()
    assert health["status"] == "ok" and health["batching"] is True
    assert {"requests", "predictor_calls", "rows"} <= set(health)
    info = ml_client.get("/info").json()
    assert info["task"] == {"kind": "multilabel", "text_columns": ["comment_text"], "id_column": "id"}
    assert info["labels"] == multilabel.label_names
    assert info["models"] == [m.name for m in multilabel.base_models]
    stack_scores = json.loads((multilabel_run / "stack" / "scores.json").read_text())
    assert info["metric"]["name"] == "mean_roc_auc"
    assert info["metric"]["cv"] == pytest.approx(stack_scores["overall"])
    assert info["metric"]["rows_validated"] == N_TRAIN
    assert {"hybridstack", "python", "fastapi", "uvicorn", "pydantic"} <= set(info["versions"])
    assert info["limits"]["max_rows"] == 8 and info["limits"]["max_chars"] == 200


# -- bad input: 422 / 413 naming the field, JSON, no traceback --------------------------------------

BAD_422 = [
    ("/predict", {"rows": [{"text": "the wrong column"}]}, "rows.0.comment_text"),
    ("/predict", {"rows": [{"comment_text": "ok"}, {}]}, "rows.1.comment_text"),
    ("/predict", {"rows": [{"comment_text": 42}]}, "rows.0.comment_text"),
    ("/predict", {"rows": [{"comment_text": ["a list"]}]}, "rows.0.comment_text"),
    ("/predict", {"rows": {"comment_text": "not a list"}}, "rows"),
    ("/predict", {"rows": []}, "rows"),
    ("/predict", {}, "rows"),
    ("/predict", None, "body"),  # empty body
    ("/predict", [1, 2], "body"),
    ("/explain", {"row": {"comment": "x"}}, "row.comment_text"),
    ("/explain", {"row": {"comment_text": "x"}, "top_k": 0}, "top_k"),
    ("/explain", None, "body"),
]


@pytest.mark.parametrize("route,body,field", BAD_422)
def test_bad_requests_get_422_naming_the_field(ml_client, route, body, field):
    r = (ml_client.post(route) if body is None else ml_client.post(route, json=body))
    assert r.status_code == 422, r.text
    answer = r.json()
    assert answer["field"] == field and answer["error"].startswith(field)
    assert "Traceback" not in r.text


def test_invalid_json_gets_422(ml_client):
    r = ml_client.post("/predict", content=b'{"rows": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "invalid JSON" in r.json()["error"]


@pytest.mark.parametrize("body,field", [
    ({"rows": [{"prompt": 1, "response_a": "a", "response_b": "b"}]}, "rows.0.prompt"),
    ({"rows": [{"prompt": "p", "response_a": [1], "response_b": "b"}]}, "rows.0.response_a"),
    ({"rows": [{"prompt": "p", "response_a": "a"}]}, "rows.0.response_b"),
])
def test_bad_pairwise_rows_get_422(pw_client, body, field):
    r = pw_client.post("/predict", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(field)


@pytest.mark.parametrize("route,body,field", [
    ("/predict", {"rows": [{"comment_text": "x"}] * 9}, "rows"),
    ("/predict", {"rows": [{"comment_text": "x"}, {"comment_text": "y" * 201}]}, "rows.1.comment_text"),
    ("/explain", {"row": {"comment_text": "y" * 201}}, "row.comment_text"),
])
def test_too_many_rows_or_too_long_texts_get_413(ml_client, route, body, field):
    r = ml_client.post(route, json=body)
    assert r.status_code == 413, r.text
    assert r.json()["field"] == field and r.json()["error"].startswith(field)
    assert ("--max-rows" if field == "rows" else "--max-chars") in r.json()["error"]


def test_turns_count_together_against_max_chars(pw_client):
    row = {"prompt": "p", "response_a": ["a" * 150, "b" * 60], "response_b": "b"}
    r = pw_client.post("/predict", json={"rows": [row]})
    assert r.status_code == 413 and r.json()["field"] == "rows.0.response_a"


def test_a_huge_body_is_refused_unread(ml_client):
    r = ml_client.post("/predict", content=b"x" * 2_000_000,
                       headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_failures_are_json_without_traceback(multilabel):
    app = create_app(multilabel)

    def broken(rows):
        raise RuntimeError("secret internals /path/to/file.py line 3")

    app.state.batcher.score = broken
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/predict", json={"rows": [{"comment_text": "x"}]})
        assert r.status_code == 500
        assert r.json() == {"error": "internal error (RuntimeError); the server log has the details"}
        assert client.get("/nowhere").status_code == 404
        assert "error" in client.get("/nowhere").json()
        assert client.get("/predict").status_code == 405


def test_a_user_error_of_the_predictor_is_422(multilabel):
    from hybridstack.errors import HybridstackError

    app = create_app(multilabel)

    def refuses(rows):
        raise HybridstackError("rows: something the user can fix")

    app.state.batcher.score = refuses
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/predict", json={"rows": [{"comment_text": "x"}]})
    assert r.status_code == 422 and r.json()["error"] == "rows: something the user can fix"


# -- serving settings on an embedding model ---------------------------------------------------


class HashEncoder:
    """A stand-in sentence encoder: a fixed unit vector per text; records its batch sizes."""

    max_seq_length = 64

    def __init__(self):
        self.batch_sizes: list[int] = []

    def get_embedding_dimension(self):
        return 8

    def encode(self, texts, batch_size=32, **kwargs):
        self.batch_sizes.append(batch_size)
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
        vectors = np.stack([np.random.default_rng(s).standard_normal(8) for s in seeds])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_tune_for_serving_finds_the_embedding_cache(tmp_path, monkeypatch):
    from hybridstack.features import embeddings

    encoder = HashEncoder()
    monkeypatch.setattr(embeddings, "_load_model", lambda path, device: encoder)
    raw = write_competition(tmp_path / "data", "multilabel", n_train=90, n_test=10)
    raw.update({"experiment": "live_embed", "workdir": str(tmp_path / "work"), "cv": {"n_splits": 3},
                "tfidf": {"enabled": False}, "finetune": {"enabled": False},
                "embed": {"model": "embedded:minilm", "prefix": "", "max_seq_length": 64,
                          "lgbm": [{"n_estimators": 20, "early_stopping_rounds": 5,
                                    "num_leaves": 7, "min_child_samples": 5, "num_threads": 1}],
                          "mlp": []},
                "stack": {"methods": ["weighted"]}})
    config = tmp_path / "embed.toml"
    config.write_text(tomli_w.dumps(raw))
    for stage in ("embed", "stack"):
        run_stage(stage, str(config), [])
    run_dir = tmp_path / "work" / "runs" / "live_embed"
    rows = [{"comment_text": f"a brand new text number {i}, you idiot"} for i in range(6)]
    plain = core.load_predictor(run_dir, tmp_path / "cache_a")
    expected = plain.predict_proba(rows)
    tuned = core.tune_for_serving(core.load_predictor(run_dir, tmp_path / "cache_b"),
                                  cpu_encode_batch=2)
    caches = [m.featurizer.cache for m in tuned.base_models
              if isinstance(getattr(m.featurizer, "cache", None), embeddings.EmbeddingCache)]
    assert caches, "no embedding cache found: tune_for_serving would do nothing"
    assert all(c.batch_size == 2 for c in caches)
    encoder.batch_sizes.clear()
    np.testing.assert_allclose(tuned.predict_proba(rows), expected, atol=ATOL)
    assert encoder.batch_sizes == [2]  # the new texts went through the encoder in batches of 2
    core.tune_for_serving(tuned, cpu_encode_batch=2)  # twice is harmless


# -- the micro-batcher ---------------------------------------------------------------------------


def _run_concurrently(batcher: MicroBatcher, requests: list[list[float]]) -> list:
    async def go():
        results = await asyncio.gather(*(batcher.submit(rows) for rows in requests),
                                       return_exceptions=True)
        await batcher.close()
        return results

    return asyncio.run(go())


def test_batcher_scores_concurrent_requests_together_in_order():
    calls = []

    def score(rows):
        calls.append(len(rows))
        return np.asarray(rows, dtype=float)[:, None] * 2

    batcher = MicroBatcher(score, wait_ms=20, max_rows=100)
    requests = [[float(i), float(i) + 0.5] for i in range(10)]
    results = _run_concurrently(batcher, requests)
    for rows, result in zip(requests, results):
        np.testing.assert_array_equal(result[:, 0], np.asarray(rows) * 2)
    assert sum(calls) == 20 and len(calls) < 10
    assert batcher.stats.requests == 10 and batcher.stats.calls == len(calls)


def test_batcher_off_scores_each_request_alone_and_max_rows_splits():
    calls = []

    def score(rows):
        calls.append(len(rows))
        return np.zeros((len(rows), 1))

    _run_concurrently(MicroBatcher(score, wait_ms=0), [[1.0]] * 6)
    assert calls == [1] * 6
    calls.clear()
    _run_concurrently(MicroBatcher(score, wait_ms=50, max_rows=4), [[1.0, 2.0]] * 6)
    assert calls == [4, 4, 4]


def test_a_lone_client_pays_no_batching_wait():
    batcher = MicroBatcher(lambda rows: np.zeros((len(rows), 1)), wait_ms=2000)

    async def one_after_another():
        started = time.perf_counter()
        for _ in range(3):
            await batcher.submit([1.0])
        await batcher.close()
        return time.perf_counter() - started

    assert asyncio.run(one_after_another()) < 1.0  # not 3 x 2 s
    assert batcher.stats.calls == 3


def test_one_bad_request_does_not_fail_its_batch():
    def score(rows):
        if any(r < 0 for r in rows):
            raise ValueError("negative")
        return np.asarray(rows, dtype=float)[:, None]

    results = _run_concurrently(MicroBatcher(score, wait_ms=20), [[1.0], [-1.0], [3.0]])
    assert isinstance(results[1], ValueError)
    assert results[0][0, 0] == 1.0 and results[2][0, 0] == 3.0


# -- a real server under load ------------------------------------------------------------------


@contextlib.contextmanager
def uvicorn_server(app):
    """``app`` served by uvicorn on 127.0.0.1 at a free port, in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


async def load_test(url: str, bodies: list[dict], clients: int, time_box_s: float) -> list:
    """POST every body to /predict from ``clients`` concurrent clients; stops at the time box.

    Returns (index, status, json) per request sent.
    """
    results: list = []
    next_index = iter(range(len(bodies)))
    deadline = time.monotonic() + time_box_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def worker():
            for i in next_index:
                if time.monotonic() > deadline:
                    return
                r = await client.post("/predict", json=bodies[i])
                results.append((i, r.status_code, r.json()))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def test_real_server_under_load_batches_and_matches_predict_proba(multilabel_run, tmp_path):
    from hybridstack.live.core import load_predictor

    workdir = multilabel_run.parent.parent
    before = folder_digest(workdir)
    predictor = load_predictor(multilabel_run, tmp_path / "cache")  # default: 5 ms batching
    texts = list(read_test_rows(multilabel_run)["comment_text"])
    rng = np.random.default_rng(0)
    n_requests, clients = 2000, 16
    # one or two rows a request, drawn from the test texts plus a few new ones
    pool = texts + [f"{t} you idiot" for t in texts[:10]]
    picks = [rng.choice(len(pool), size=int(rng.integers(1, 3))) for _ in range(n_requests)]
    bodies = [{"rows": [{"comment_text": pool[j]} for j in pick]} for pick in picks]
    expected = predictor.predict_proba([{"comment_text": t} for t in pool])

    app = create_app(predictor)
    with uvicorn_server(app) as url:
        started = time.monotonic()
        results = asyncio.run(load_test(url, bodies, clients, time_box_s=150))
        elapsed = time.monotonic() - started
        health = httpx.get(f"{url}/health").json()

    assert len(results) == n_requests, f"only {len(results)} requests in the time box"
    assert [status for _, status, _ in results].count(200) == n_requests  # zero errors
    for i, _, answer in results:
        got = np.array([list(p["probabilities"].values()) for p in answer["predictions"]])
        np.testing.assert_allclose(got, expected[picks[i]], atol=ATOL)
    assert health["requests"] == n_requests
    assert health["predictor_calls"] < n_requests  # micro-batched
    assert health["largest_batch"] > 1
    print(f"{n_requests} requests, {clients} clients: {n_requests / elapsed:.0f} req/s, "
          f"{health['predictor_calls']} predictor calls")
    assert folder_digest(workdir) == before  # run folder and workdir byte-identical


# -- the commands ------------------------------------------------------------------------------


def test_commands_register_with_argparse():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_ui_parser(sub)
    add_serve_parser(sub)
    ui = parser.parse_args(["ui", "runs/x"])
    assert (ui.host, ui.port, ui.labels, ui.cache_dir) == ("127.0.0.1", 8501, None, None)
    assert ui.func.__name__ == "cmd_ui"
    serve = parser.parse_args(["serve", "runs/x", "--batch-wait-ms", "0"])
    assert (serve.host, serve.port, serve.max_rows, serve.max_chars) == ("127.0.0.1", 8000, 256, 20000)
    assert serve.batch_wait_ms == 0 and serve.func.__name__ == "cmd_serve"
    command = ui_command(parser.parse_args(["ui", "runs/x", "--port", "9999"]))
    flags = dict(zip(command[5::2], command[6::2]))
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "9999"


@pytest.mark.parametrize("command,extra,module", [("ui", "ui", "streamlit"),
                                                  ("serve", "serve", "fastapi"),
                                                  ("serve", "serve", "uvicorn")])
def test_without_the_extra_one_line_and_exit_2(monkeypatch, capsys, multilabel_run, command,
                                               extra, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert main([command, str(multilabel_run)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: hybridstack {command} needs the {extra} extra: "
                   f"pip install 'hybridstack[{extra}]'\n")


def test_help_works_without_the_extras():
    blocked = ("streamlit", "fastapi", "uvicorn", "starlette")
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None\n"
            "import hybridstack.live.commands\n"
            "from hybridstack.cli import main\n"
            "from hybridstack.live.commands import main as live_main\n"
            "for run in (main, live_main):\n"
            "    try:\n"
            "        run(['--help'])\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ui" in done.stdout and "serve" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["serve", "{run}", "--max-rows", "0"], "--max-rows must be >= 1"),
    (["serve", "{run}", "--batch-wait-ms", "-1"], "--batch-wait-ms must be >= 0"),
    (["serve", "{run}", "--port", "70000"], "--port must be 0-65535"),
    (["serve", "{tmp}"], "is not an experiment folder"),
    (["ui", "{run}", "--labels", "{tmp}/missing.csv"], "--labels: file not found"),
])
def test_bad_arguments_are_one_line(capsys, multilabel_run, tmp_path, args, message):
    argv = [a.format(run=multilabel_run, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
