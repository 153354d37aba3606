"""How many data-parallel processes this machine can run (GPUs, or CPU cores with ``cpu``),
and the environment each one starts with.

The processes themselves are started by :mod:`hybridstack.pipeline` (the fine-tune) and
:mod:`hybridstack.predict.batch` (prediction split over GPUs).
"""

from __future__ import annotations

import os

import torch

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


def worker_env(num_processes: int, cpu: bool) -> dict[str, str]:
    """The environment of one of ``num_processes`` worker processes.

    On a CPU the processes share the cores: one BLAS pool each avoids oversubscription.
    """
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return env
