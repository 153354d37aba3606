"""Memory of the fine-tune's token ids: Python int lists (before) vs the flat int32 TokenStore.

An LMSYS-shaped train set (bench/scale_data.py, default 8,000 rows) is rendered as the
finetune stage renders it (the lmsys recipe's budget: max_length 512, [0.2, 0.4, 0.4], head+tail,
the A/B-swapped view too) with MiniLM's WordPiece tokenizer. Each variant runs in its own
subprocess, the two interleaved over ``--repeats`` rounds:

* before: the stage's rendering at ``--before`` (a git commit, default 66951fd: token ids as
  lists of Python ints), extracted with ``git archive``;
* after: this checkout's ``TokenFeaturizer.render_store``.

Recorded per variant: the bytes of the token-id objects themselves (lists and their int
objects, or the store's arrays), RSS held once the ids exist (above the RSS just before rendering),
the peak RSS while rendering (sampled every 20 ms), the tokens held and the bytes per token.

    python bench/bench_token_store.py [--rows 8000] [--repeats 2] [--before 66951fd]

Writes bench/results/token_store.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from source_at import export_source

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "token_store.json"

CHILD = r"""
import json, sys, threading, time
import psutil
from hybridstack.config import load_config
from hybridstack.experiment import open_experiment
from hybridstack.finetune.model import load_tokenizer
from hybridstack.models import resolve_model
from hybridstack.stages.finetune import token_featurizer

cfg = load_config(sys.argv[1])
exp = open_experiment(cfg)
tokenizer = load_tokenizer(resolve_model("embedded:minilm", "bench"))
featurizer = token_featurizer(exp)
proc = psutil.Process()
start = proc.memory_info().rss
peak = [start]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()
if hasattr(featurizer, "render_store"):
    views = featurizer.render_store(tokenizer, exp.train.fields, exp.train.turns)
    tokens = sum(int(v.lengths.sum()) for v in views) if isinstance(views, list) else int(views.lengths.sum())
else:
    views = featurizer.render(tokenizer, exp.train.fields, exp.train.turns)
    tokens = sum(len(ids) for view in views for ids in view)
seconds = time.perf_counter() - started
held = proc.memory_info().rss
if hasattr(featurizer, "render_store"):  # the arrays' own bytes
    store = views if not isinstance(views, list) else views[0]
    object_bytes = int(store.flat.nbytes + store.starts.nbytes + store.ends.nbytes)
else:  # each list and each int object it holds (ints below 257 are shared singletons)
    object_bytes = sum(sys.getsizeof(view) for view in views) + sum(
        sys.getsizeof(ids) + sum(sys.getsizeof(t) for t in ids if t > 256)
        for view in views for ids in view)
done.set()
import hybridstack
print(json.dumps({"code": hybridstack.__file__, "store": hasattr(featurizer, "render_store"),
                  "rows": len(exp.train), "tokens": tokens, "seconds": round(seconds, 2),
                  "held_bytes": held - start, "object_bytes": object_bytes, "peak_bytes": max(peak[0], held) - start}))
"""


def run_variant(pythonpath: Path, config: Path) -> dict:
    env_path = str(pythonpath)
    # cwd: not the checkout, whose hybridstack/ would shadow PYTHONPATH's for ``python -c``
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config)], capture_output=True, text=True,
                          cwd=config.parent, env={"PYTHONPATH": env_path, "HF_HUB_OFFLINE": "1",
                               "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise SystemExit(f"variant at {pythonpath} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--before", default="66951fd")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    import scale_data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scale_data.write("lmsys", tmp / "data", args.rows, n_test=10)
        before = export_source(args.before, tmp / "before")
        config = tmp / "lmsys.toml"
        subprocess.run([sys.executable, "-m", "hybridstack", "init", str(tmp / "data"), "--recipe",
                        "lmsys", "-o", str(config)], check=True, capture_output=True)
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(args.repeats):  # interleaved: a slow spell hits both variants alike
            runs["before"].append(run_variant(before, config))
            runs["after"].append(run_variant(ROOT, config))

    def median(variant: str, key: str) -> float:
        values = sorted(r[key] for r in runs[variant])
        return values[len(values) // 2]

    summary = {v: {"object_bytes": median(v, "object_bytes"),
                   "object_bytes_per_token": round(median(v, "object_bytes") / runs[v][0]["tokens"], 2),
                   "held_bytes": median(v, "held_bytes"), "peak_bytes": median(v, "peak_bytes"),
                   "seconds": median(v, "seconds"), "tokens": runs[v][0]["tokens"],
                   "held_bytes_per_token": round(median(v, "held_bytes") / runs[v][0]["tokens"], 1)}
               for v in runs}
    result = {"rows": args.rows, "data": "bench/scale_data.py lmsys (train rows, + swapped view)",
              "tokenizer": "all-MiniLM-L6-v2 WordPiece", "recipe": "lmsys (max_length 512)",
              "before": args.before, "repeats": args.repeats, "runs": runs, "median": summary,
              "object_ratio": round(summary["before"]["object_bytes"] / summary["after"]["object_bytes"], 2),
              "held_ratio": round(summary["before"]["held_bytes"] / max(summary["after"]["held_bytes"], 1), 2),
              "peak_ratio": round(summary["before"]["peak_bytes"] / max(summary["after"]["peak_bytes"], 1), 2)}
    assert summary["before"]["tokens"] == summary["after"]["tokens"], "the two renderings differ"
    for v in ("before", "after"):
        s = summary[v]
        print(f"{v:6s}: {s['tokens']:,} tokens in {s['object_bytes'] / 2**20:,.1f} MiB of objects "
              f"({s['object_bytes_per_token']} B/token); RSS held {s['held_bytes'] / 2**20:,.0f} MiB "
              f"({s['held_bytes_per_token']} B/token), peak +{s['peak_bytes'] / 2**20:,.0f} MiB, "
              f"{s['seconds']} s")
    print(f"token-id objects {result['object_ratio']}x smaller; RSS held {result['held_ratio']}x "
          f"less, peak {result['peak_ratio']}x less (the rest: the tokenizer's own transient lists)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
