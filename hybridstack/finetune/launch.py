"""``hybridstack run finetune --num-processes N``: one data-parallel process per device.

The stage is re-run under ``torch.distributed.run`` (what ``accelerate launch
--multi_gpu`` uses underneath); Accelerate picks the rendezvous up from the environment.
It is also the only route to N CPU processes (gloo), which ``accelerate launch --cpu``
cannot start without MPI. ``--standalone`` picks a free port, so runs never collide.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from hybridstack.config import load_config
from hybridstack.errors import HybridstackError


def check_devices(num_processes: int, cpu: bool) -> None:
    """One error line when there are more processes than GPUs (or CPU cores with ``cpu``)."""
    if num_processes < 1:
        raise HybridstackError(f"--num-processes {num_processes}: must be at least 1")
    if cpu:
        cores = os.cpu_count() or 1
        if num_processes > cores:
            raise HybridstackError(
                f"--num-processes {num_processes} --cpu: this machine has {cores} CPU cores; "
                f"use --num-processes {cores} or fewer"
            )
        return
    gpus = torch.cuda.device_count()
    if num_processes > gpus:
        raise HybridstackError(
            f"--num-processes {num_processes}: only {gpus} GPU(s) visible; use --num-processes "
            f"{max(gpus, 1)}{'' if gpus else ' (or add --cpu to run CPU processes)'}"
        )


def launch_command(config_path: str | Path, overrides: list[str], num_processes: int) -> list[str]:
    """The ``torch.distributed.run`` command line that runs the finetune stage N times."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(num_processes),
               "-m", "hybridstack.stages.finetune", "-c", str(config_path)]
    for item in overrides:
        command += ["--set", item]
    return command


def launch_multiprocess(config_path: str | Path, overrides: list[str] | None, num_processes: int,
                        cpu: bool = False) -> int:
    """Run the finetune stage in ``num_processes`` data-parallel processes; return its exit status.

    The config is validated here first, so a bad key is one error line, not N tracebacks.
    """
    overrides = list(overrides or [])
    load_config(config_path, overrides)
    check_devices(num_processes, cpu)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
        # N processes share the cores: one BLAS pool each avoids oversubscription
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    code = subprocess.run(launch_command(config_path, overrides, num_processes), env=env).returncode
    if code != 0:
        print(f"error: finetune with {num_processes} processes exited with status {code} "
              "(see the messages above); re-run the same command to resume", file=sys.stderr)
    return code
