"""Running stages in order on one opened experiment.

The experiment (inputs read, parsed, hashed; folds made) is opened once per process and
handed to each stage as ``stage.run(exp)``. A data-parallel fine-tune runs in worker
processes started with ``torch.distributed.run``; they load the opened experiment from a
snapshot the parent writes, instead of re-reading the inputs.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from hybridstack.config import Config, load_config
from hybridstack.experiment import Experiment, open_experiment, save_snapshot
from hybridstack.stages import STAGE_ORDER

SNAPSHOT_FILE = ".experiment.joblib"  # in the run folder while a multi-process stage runs


def stage_module(name: str):
    return importlib.import_module(f"hybridstack.stages.{name}")


def run_pipeline(cfg: Config, stages: tuple[str, ...] = STAGE_ORDER, num_processes: int = 1,
                 cpu: bool = False) -> tuple[int, Experiment]:
    """Open the experiment once and run ``stages`` on it; the fine-tune on ``num_processes``.

    Returns the exit status (non-zero when a multi-process fine-tune failed: the later
    stages are then not run) and the experiment.
    """
    if num_processes > 1:
        from hybridstack.finetune.launch import check_devices  # torch: only when needed

        check_devices(num_processes, cpu)  # before any work, not after the first stages
    exp = open_experiment(cfg)
    for name in stages:
        print(f"== stage {name} ==", flush=True)
        if name == "finetune" and num_processes > 1:
            code = launch_multiprocess(exp, num_processes, cpu)
            if code != 0:
                return code, exp
            continue
        stage_module(name).run(exp)
    return 0, exp


def run_stage(name: str, config_path: str | Path, overrides: list[str] | None = None,
              num_processes: int = 1, cpu: bool = False) -> tuple[int, Experiment]:
    """``hybridstack run <name>`` without the report: one stage, or ``all`` in order."""
    cfg = load_config(config_path, list(overrides or []))
    stages = STAGE_ORDER if name == "all" else (name,)
    return run_pipeline(cfg, stages, num_processes, cpu)


def launch_command(snapshot: Path, num_processes: int) -> list[str]:
    """The ``torch.distributed.run`` command line that runs the finetune stage N times.

    ``--standalone`` picks a free rendezvous port, so runs never collide; it is also the
    only route to N CPU processes (gloo), which ``accelerate launch --cpu`` cannot start.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(num_processes),
            "-m", "hybridstack.stages.finetune", "--experiment", str(snapshot)]


def launch_multiprocess(exp: Experiment, num_processes: int, cpu: bool = False) -> int:
    """Run the finetune stage on ``exp`` in ``num_processes`` data-parallel processes."""
    from hybridstack.finetune.launch import check_devices, worker_env

    check_devices(num_processes, cpu)
    snapshot = exp.dir.path / SNAPSHOT_FILE
    save_snapshot(exp, snapshot)
    env = worker_env(num_processes, cpu)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    try:
        code = subprocess.run(launch_command(snapshot, num_processes), env=env).returncode
    finally:
        snapshot.unlink(missing_ok=True)
    if code != 0:
        print(f"error: finetune with {num_processes} processes exited with status {code} "
              "(see the messages above); re-run the same command to resume", file=sys.stderr)
    return code
