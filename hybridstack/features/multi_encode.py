"""Encoding on several devices at once: one sentence-transformers worker process per device.

:class:`~hybridstack.features.embeddings.EmbeddingCache` asks :func:`encode_devices` which
devices to use, opens :func:`encoding_pool` once per encode call and sends each shard's
texts through :func:`encode_on_pool`. The parent process keeps writing the shards, so the
cache's atomic shard protocol is unchanged, and only one shard's texts (``shard_rows``) are
in flight at a time: 300k texts never travel to the workers in one pickle.

Which devices (first that applies):

1. the ``devices`` argument of the cache;
2. the environment variable ``HYBRIDSTACK_ENCODE_DEVICES``: comma-separated torch devices,
   e.g. ``cuda:0,cuda:1``, or ``cpu,cpu`` (two CPU processes; used by the tests);
   ``auto`` or empty means automatic;
3. automatic: every visible CUDA GPU when there are two or more (Kaggle's 2 x T4), the
   cache was given no explicit ``device`` and this is not one rank of a distributed launch
   (``WORLD_SIZE`` > 1: each rank already has its GPU); otherwise one process, as before.

A single entry (``cuda:1``, ``cpu``) encodes in this process on that device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridstack.errors import HybridstackError, one_line

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

ENCODE_DEVICES_ENV = "HYBRIDSTACK_ENCODE_DEVICES"
_AUTO = "auto"


def parse_devices(spec: str | Sequence[str]) -> list[str] | None:
    """``"cuda:0, cuda:1"`` or a list of devices -> ``["cuda:0", "cuda:1"]``; None for automatic."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    devices = [str(part).strip() for part in parts if str(part).strip()]
    if not devices or devices == [_AUTO]:
        return None
    if _AUTO in devices:
        raise HybridstackError(f"{ENCODE_DEVICES_ENV}: 'auto' cannot be combined with devices, "
                               f"got {', '.join(devices)}")
    return devices


def encode_devices(requested: str | Sequence[str] | None, device: str | None) -> list[str] | None:
    """The devices to encode on, or None for one process on ``device`` (the old behaviour).

    Parameters
    ----------
    requested : str, sequence of str or None
        The cache's ``devices`` argument; None falls back to ``HYBRIDSTACK_ENCODE_DEVICES``,
        then to automatic (see the module docstring).
    device : str or None
        The cache's single ``device``; an explicit one turns the automatic choice off.

    Returns
    -------
    list of str or None
        One entry per worker process (length >= 1), or None.
    """
    chosen = parse_devices(requested) if requested is not None else None
    if chosen is None:
        chosen = parse_devices(os.environ.get(ENCODE_DEVICES_ENV, ""))
    if chosen is None and device is None:
        chosen = _visible_gpus()
    return chosen


def _visible_gpus() -> list[str] | None:
    """``cuda:0..n-1`` when two or more GPUs are visible; one GPU is fastest in-process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return None  # under accelerate/torchrun every rank spreading over all GPUs would clash
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] if count >= 2 else None


def is_multi_process(devices: list[str] | None) -> bool:
    return devices is not None and len(devices) > 1


@contextmanager
def encoding_pool(model: SentenceTransformer, devices: list[str] | None) -> Iterator[Any]:
    """A sentence-transformers worker pool on ``devices`` (None when one process suffices).

    The pool is stopped (workers terminated and joined) however the block ends, so an
    error or Ctrl-C leaves no worker behind. Starting a pool moves ``model`` to the CPU
    (its weights are shared with the workers); it is moved back afterwards.
    """
    if not is_multi_process(devices):
        yield None
        return
    home = model.device
    log.info("encoding on %d processes: %s", len(devices), ", ".join(devices))
    pool = model.start_multi_process_pool(devices)
    try:
        yield pool
    finally:
        model.stop_multi_process_pool(pool)
        model.to(home)


def encode_on_pool(model: SentenceTransformer, pool: Any, texts: list[str], *,
                   batch_size: int, normalize: bool) -> np.ndarray:
    """Encode ``texts`` (one shard) across the pool's workers; float32 (len(texts), dim).

    Chunks are one batch each, so every worker stays busy until the shard's last batch
    and waits at most one batch before the next shard comes. A worker's exception, or a
    worker that died, becomes one :class:`HybridstackError` naming the devices.
    """
    try:
        return model.encode(texts, pool=pool, chunk_size=batch_size, batch_size=batch_size,
                            convert_to_numpy=True, normalize_embeddings=normalize,
                            show_progress_bar=False)
    except Exception as err:
        raise HybridstackError(
            f"embed: encoding in {len(pool['processes'])} worker processes failed: {type(err).__name__}: "
            f"{one_line(err)[:500]}; the workers were stopped. Set {ENCODE_DEVICES_ENV}=cuda:0 "
            "(or cpu) to encode in one process"
        ) from err
