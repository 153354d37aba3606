"""The layout change keeps behaviour: the demo through `run all` with the code before and after,
side by side in one run; every model's oof.npy and test.npy must be identical, and the wall
times are compared (the new pipeline opens each experiment once instead of five times).

    python bench/bench_layout.py --before <checkout of the old code> [--rows 300] [--repeats 1]

Both run with this interpreter's packages; ``PYTHONPATH`` picks the checkout. Writes
bench/results/layout.json; exits 1 when any array differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run_demo(checkout: Path, workdir: Path, rows: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hybridstack", "demo", "--workdir", str(workdir),
                    "--rows", str(rows)], env=env, check=True, cwd=workdir.parent,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def arrays(workdir: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(workdir)): np.load(p) for p in sorted(workdir.glob("runs/*/*/*/*.npy"))
            if p.name in ("oof.npy", "test.npy")} | {
        str(p.relative_to(workdir)): np.load(p) for p in sorted(workdir.glob("runs/*/stack/*.npy"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="checkout of the code before the change")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    seconds: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so load on the machine hits both alike
            for name, checkout in (("before", Path(args.before)), ("after", REPO)):
                workdir = Path(tmp) / f"{name}_{r}" / "demo"
                workdir.parent.mkdir(parents=True)
                seconds[name].append(run_demo(checkout.resolve(), workdir, args.rows))
        before, after = arrays(Path(tmp) / "before_0" / "demo"), arrays(Path(tmp) / "after_0" / "demo")
    different = sorted(k for k in before if k not in after or not np.array_equal(
        before[k], after[k], equal_nan=True))
    result = {"rows": args.rows, "arrays_compared": len(before), "arrays_different": different,
              "seconds": seconds,
              "ratio_after_over_before": float(np.median(seconds["after"]) / np.median(seconds["before"]))}
    out = REPO / "bench" / "results" / "layout.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if different or set(before) != set(after) else 0


if __name__ == "__main__":
    sys.exit(main())
