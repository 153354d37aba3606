"""Every speed/memory benchmark in one run (`make bench`); each writes bench/results/<name>.json.

    python bench/run_all.py [--only embed_cache padding memory]

Each benchmark measures its own side-by-side comparison in one process and prints its
ratios; this script runs them one after the other (never in parallel: they share the
2 cores) and prints a summary of the JSON files they wrote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BENCHMARKS = {
    "embed_cache": "bench_embed_cache.py",
    "padding": "bench_padding.py",
    "memory": "bench_memory.py",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=list(BENCHMARKS))
    args = parser.parse_args()
    failed = []
    for name in args.only:
        print(f"\n===== {name} =====", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(BENCH / BENCHMARKS[name])])
        print(f"===== {name}: exit {code} in {time.perf_counter() - started:.0f}s", flush=True)
        if code:
            failed.append(name)
    print("\n===== results =====")
    for name in args.only:
        path = BENCH / "results" / f"{name}.json"
        if path.is_file():
            print(f"{path.relative_to(BENCH.parent)}: {json.dumps(json.loads(path.read_text()))[:300]}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
