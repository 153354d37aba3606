"""The ``hybridstack`` package as of a git commit, for benchmarks that run "before" beside "after"."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export_source(ref: str, into: Path) -> Path:
    """``hybridstack/`` as of git ``ref``, written under ``into`` (put ``into`` on PYTHONPATH)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "hybridstack"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into
