"""Benchmark ``hybridstack serve``: requests/s and p50/p99 latency at 1, 4 and 16 concurrent
clients, micro-batching on (``--batch-wait-ms 5``) and off (``0``), side by side in one run.

    python bench/bench_serve.py [--train-rows 2000] [--test-rows 200] [--requests 200]

The experiment: the first ``--train-rows`` rows of ../shared/data/jigsaw-toxic-10k
(multilabel, 6 labels) through tfidf + embed (MiniLM, ``embedded:minilm``, LightGBM and MLP
heads with kNN features) + stack, built once under bench/results/tmp/serve (reused when
finished). Two servers run at once, one per mode, each a ``python -m hybridstack.live
serve`` process with its own fresh ``--cache-dir``, on 127.0.0.1. For each number of
clients both servers get the same requests back to back (order alternating), in
``--rounds`` rounds; the summary keeps each cell's best round, since the machine is shared: one row a
request, texts that neither the experiment nor an earlier level has seen, so every request
encodes a new text with MiniLM as a live service would. ``--requests`` x clients requests
a level (time-boxed). Latency is measured by the clients (httpx, one process); the
predictor calls come from each server's ``/health``. Results: bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hybridstack.live.core import SERVE_CPU_ENCODE_BATCH  # noqa: E402

BENCH = Path(__file__).resolve().parent
DATA = BENCH.parents[1] / "shared" / "data" / "jigsaw-toxic-10k"
RESULTS = BENCH / "results" / "serve.json"
WORK = BENCH / "results" / "tmp" / "serve"
EXPERIMENT = "serve_bench"
CLIENTS = (1, 4, 16)
MODES = {"on": 5.0, "off": 0.0}  # --batch-wait-ms
LEVEL_TIME_BOX_S = 120
WARMUP_REQUESTS = 10


def experiment_config(folder: Path, train_rows: int) -> dict:
    return {
        "experiment": EXPERIMENT, "workdir": str(folder / "work"),
        "task": {"kind": "multilabel", "id_column": "id", "text_columns": ["comment_text"],
                 "label_columns": ["toxic", "severe_toxic", "obscene", "threat", "insult",
                                   "identity_hate"]},
        "data": {"train": str(folder / "train.csv"), "test": str(folder / "test.csv"),
                 "sample_submission": str(folder / "sample_submission.csv")},
        "cv": {"n_splits": 3, "seed": 42},
        "tfidf": {"max_word_features": 20_000, "max_char_features": 50_000, "min_df": 2},
        "embed": {"model": "embedded:minilm", "prefix": "", "max_seq_length": 128,
                  "lgbm": [{"n_estimators": 300, "early_stopping_rounds": 30, "num_leaves": 15,
                            "num_threads": 2}],
                  "mlp": [{"hidden_sizes": [128], "max_epochs": 30}]},
        "finetune": {"enabled": False},
        "stack": {"methods": ["weighted", "logreg"]},
    }


def build_experiment(train_rows: int, test_rows: int) -> Path:
    """The small experiment (reused when its stack is finished); returns its run folder."""
    import tomli_w

    from hybridstack.commands.report import write_report
    from hybridstack.commands.run import run_stage

    run_dir = WORK / "work" / "runs" / EXPERIMENT
    if (run_dir / "stack" / "DONE").is_file() and (run_dir / "report").is_dir():
        return run_dir
    WORK.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(DATA / "train.csv", dtype=str, keep_default_na=False).head(train_rows)
    test = pd.read_csv(DATA / "test.csv", dtype=str, keep_default_na=False).head(test_rows)
    train.to_csv(WORK / "train.csv", index=False)
    test.to_csv(WORK / "test.csv", index=False)
    sample = pd.read_csv(DATA / "sample_submission.csv", dtype=str).set_index("id")
    sample.loc[test["id"]].reset_index().to_csv(WORK / "sample_submission.csv", index=False)
    labels = pd.read_csv(DATA / "test_labels.csv", dtype=str).set_index("id")
    labels.loc[test["id"]].reset_index().to_csv(WORK / "test_labels.csv", index=False)
    config = WORK / "serve_bench.toml"
    config.write_text(tomli_w.dumps(experiment_config(WORK, train_rows)))
    for stage in ("tfidf", "embed", "stack"):
        started = time.perf_counter()
        run_stage(stage, str(config), [])
        print(f"built {stage} in {time.perf_counter() - started:.0f}s", flush=True)
    write_report(run_dir)
    return run_dir


def unseen_texts(train_rows: int, test_rows: int) -> list[str]:
    """Texts the experiment never saw: later train rows and later test rows, de-duplicated."""
    train = pd.read_csv(DATA / "train.csv", dtype=str, keep_default_na=False)["comment_text"]
    test = pd.read_csv(DATA / "test.csv", dtype=str, keep_default_na=False)["comment_text"]
    seen = set(train[:train_rows]) | set(test[:test_rows])
    pool = [t for t in dict.fromkeys([*train[train_rows:], *test[test_rows:]]) if t not in seen]
    return pool


# -- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run_dir: Path, wait_ms: float, cache_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "hybridstack.live", "serve", str(run_dir), "--port", str(port),
               "--batch-wait-ms", str(wait_ms), "--cache-dir", str(cache_dir)]
    log = open(cache_dir.parent / f"server_{port}.log", "wb")  # noqa: SIM115 (a pipe could fill)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = Path(log.name)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server at {url} not ready in {timeout_s}s")


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        return json.loads(r.read())


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- clients ------------------------------------------------------------------------------------


async def drive(url: str, texts: list[str], clients: int, time_box_s: float) -> dict:
    """``clients`` concurrent clients POST one text each until the texts or the time box end."""
    import httpx

    latencies, errors = [], 0
    todo = iter(texts)
    deadline = time.monotonic() + time_box_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker():
            nonlocal errors
            for text in todo:
                if time.monotonic() > deadline:
                    return
                started = time.perf_counter()
                try:
                    r = await client.post("/predict", json={"rows": [{"comment_text": text}]})
                    ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "wall_s": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "mean_ms": round(float(lat.mean()), 2)}


def measure(url: str, texts: list[str], clients: int) -> dict:
    """One level on one server: the clients' figures and the server's predictor calls."""
    before = health(url)
    level = asyncio.run(drive(url, texts, clients, LEVEL_TIME_BOX_S))
    after = health(url)
    calls = after["predictor_calls"] - before["predictor_calls"]
    level.update(clients=clients, predictor_calls=calls,
                 rows_per_call=round((after["rows"] - before["rows"]) / max(calls, 1), 2))
    return level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--requests", type=int, default=60,
                        help="requests per client at each level (default 60)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds over every level (default 2); the summary takes each "
                             "cell's best round")
    args = parser.parse_args()

    started = time.perf_counter()
    reused = (WORK / "work" / "runs" / EXPERIMENT / "stack" / "DONE").is_file()
    run_dir = build_experiment(args.train_rows, args.test_rows)
    build_s = time.perf_counter() - started
    pool = unseen_texts(args.train_rows, args.test_rows)
    needed = WARMUP_REQUESTS + args.rounds * sum(args.requests * c for c in CLIENTS)
    if len(pool) < needed:
        raise SystemExit(f"only {len(pool)} unseen texts for {needed} requests: lower --requests")
    warmup, rest = pool[:WARMUP_REQUESTS], pool[WARMUP_REQUESTS:]
    models = [p.name for p in sorted((run_dir / "models").iterdir()) if (p / "DONE").is_file()]

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        servers = {mode: start_server(run_dir, wait_ms, Path(tmp) / f"cache_{mode}")
                   for mode, wait_ms in MODES.items()}
        try:
            for proc, url in servers.values():
                wait_ready(proc, url)
                asyncio.run(drive(url, warmup, 1, 60))  # first calls: lazy imports, thread start
            offset, k = 0, 0
            for round_ in range(args.rounds):
                for clients in CLIENTS:
                    texts = rest[offset:offset + args.requests * clients]
                    offset += len(texts)
                    order = list(MODES) if k % 2 == 0 else list(MODES)[::-1]
                    k += 1
                    for mode in order:
                        level = measure(servers[mode][1], texts, clients)
                        level.update(round=round_ + 1, batching=mode, batch_wait_ms=MODES[mode])
                        results.append(level)
                        print(f"round {round_ + 1}  clients {clients:>2}  batching {mode:<3}  "
                              f"{level['requests_per_s']:7.1f} req/s  p50 {level['p50_ms']:7.1f} ms  "
                              f"p99 {level['p99_ms']:7.1f} ms  {level['requests']} requests, "
                              f"{level['errors']} errors, {level['predictor_calls']} predictor calls",
                              flush=True)
        finally:
            for proc, _ in servers.values():
                stop(proc)

    # the machine is shared: each cell is its best round (the least disturbed one)
    best = {}
    for r in results:
        cell = (r["batching"], r["clients"])
        if cell not in best or r["requests_per_s"] > best[cell]["requests_per_s"]:
            best[cell] = r
    summary = [{k: best[mode, c][k] for k in ("batching", "clients", "requests_per_s", "p50_ms",
                                              "p99_ms", "rows_per_call", "errors")}
               for c in CLIENTS for mode in MODES]
    speedup = {str(c): round(best["on", c]["requests_per_s"] / best["off", c]["requests_per_s"], 2)
               for c in CLIENTS}
    for row in summary:
        print(f"best: clients {row['clients']:>2}  batching {row['batching']:<3}  "
              f"{row['requests_per_s']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
              f"p99 {row['p99_ms']:7.1f} ms  {row['rows_per_call']} rows a call")
    out = {
        "benchmark": "hybridstack serve: micro-batching on vs off",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "note": "the client and both servers share the cores (with any other "
                            "work on the machine): each summary cell is its best round"},
        "experiment": {"data": "jigsaw-toxic-10k (first rows)", "train_rows": args.train_rows,
                       "test_rows": args.test_rows, "base_models": models,
                       "stack": json.loads((run_dir / "stack" / "weights.json").read_text())["method"],
                       "build_s": round(build_s, 1), "reused": reused},
        "request": "one row a request, each text new to the server (MiniLM encodes it)",
        "server": {"batch_wait_ms": MODES, "max_batch_rows": 1024,
                   "cpu_encode_batch": SERVE_CPU_ENCODE_BATCH, "process": "python -m hybridstack.live serve"},
        "requests_per_client": args.requests, "rounds": args.rounds,
        "summary_best_round": summary,
        "results": results,
        "throughput_ratio_on_over_off": speedup,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"throughput, batching on / off: {speedup}")
    print(f"-> {RESULTS.relative_to(BENCH.parent)}")


if __name__ == "__main__":
    main()
