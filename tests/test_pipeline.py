"""The pipeline opens an experiment once per process: `run all` reads, parses and hashes each
input file once, and the read-only commands write nothing."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from hybridstack import experiment, tables
from hybridstack.cli import main


def test_run_all_reads_and_hashes_each_input_once(make_config, monkeypatch):
    cfg, path = make_config("multiclass", n_train=60, n_test=15, stack={"enabled": True})
    reads, hashes = Counter(), Counter()
    real_read, real_hash = tables.read_table, tables.file_sha256

    def counting_read(file, *args, **kwargs):
        reads[Path(file).name] += 1
        return real_read(file, *args, **kwargs)

    def counting_hash(file):
        hashes[Path(file).name] += 1
        return real_hash(file)

    monkeypatch.setattr(experiment, "read_table", counting_read)
    monkeypatch.setattr(experiment, "file_sha256", counting_hash)
    assert main(["run", "all", "-c", str(path)]) == 0
    assert (cfg.run_dir / "stack" / "DONE").is_file() and (cfg.run_dir / "report" / "report.md").is_file()
    files = {"train.csv": 1, "test.csv": 1, "sample_submission.csv": 1}
    assert dict(reads) == files and dict(hashes) == files


def test_read_only_commands_write_nothing(make_config, capsys):
    cfg, path = make_config("multiclass", n_train=60, n_test=15, stack={"enabled": True})
    assert main(["run", "all", "-c", str(path)]) == 0
    runs = cfg.workdir

    def digest() -> dict[str, str]:
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(runs.rglob("*")) if p.is_file() and "report" not in p.parts}

    before = digest()
    assert main(["audit", str(cfg.run_dir), "--permutation-rows", "60"]) in (0, 1)
    assert main(["compare", str(cfg.workdir)]) == 0
    assert main(["report", str(cfg.run_dir)]) == 0  # writes only its own report/
    assert digest() == before
