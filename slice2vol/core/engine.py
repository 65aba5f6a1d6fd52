"""The one task engine of ``slice2vol batch`` and ``slice2vol benchmark``: dask.distributed.

Without a scheduler address a :class:`~dask.distributed.LocalCluster` runs on this machine, one task
at a time per worker process (``threads_per_worker=1`` in dask's sense: the torch threads *inside*
a task are the caller's ``--threads-per-worker`` / ``--threads``).  With ``scheduler="tcp://..."``
the tasks go to a running cluster (``dask scheduler`` + ``dask worker`` processes, or one started
by dask-jobqueue on SLURM / PBS); the workers must then see the same file system.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from slice2vol.errors import Slice2VolError

__all__ = ["dask_client", "default_workers", "CONNECT_TIMEOUT"]

#: how long to try reaching a ``--scheduler`` before giving up (a cluster's scheduler may be starting)
CONNECT_TIMEOUT = "20s"


def default_workers(threads_per_task: int | None, on_gpu: bool = False) -> int:
    """Worker processes that fill this machine: cores / torch threads per task (at least 1).

    ``None`` (torch's default, every core) gives one worker, so tasks never oversubscribe the CPU.
    ``on_gpu`` (the tasks run with ``--device cuda``/``auto`` on a machine with a GPU) gives one
    worker: every task would use the same card, each checking only its own memory budget against
    it, and the time figures would measure the contention (``--workers N`` still overrides).
    """
    if on_gpu:
        return 1
    cores = os.cpu_count() or 1
    return max(1, cores // (threads_per_task or cores))


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, threads_per_task: int | None = None,
                verbose: bool = False, processes: bool = True, on_gpu: bool = False) -> Iterator:
    """A dask ``Client`` for the duration of the ``with`` block (the LocalCluster, if one was
    started here, is closed afterwards).

    Args:
        scheduler: address of a running scheduler (``tcp://host:8786``); ``None`` starts a LocalCluster.
        workers: LocalCluster worker processes (default :func:`default_workers`); ignored with ``scheduler``.
        threads_per_task: torch threads each task will use, only for the default worker count.
        verbose: keep dask's own INFO log lines.
        processes: ``False`` makes the LocalCluster's workers threads of this process (tests and
            debugging: whatever the caller patched in this process is what runs).
        on_gpu: the tasks run on this machine's GPU: one worker by default (:func:`default_workers`).

    Raises:
        Slice2VolError: when the scheduler cannot be reached, or ``workers`` < 1.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - a dependency of slice2vol
        raise Slice2VolError("this command needs dask.distributed (pip install 'dask[distributed]')") from None
    for name in ("distributed", "tornado", "bokeh"):  # dask's own INFO lines (set on its import)
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise Slice2VolError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        with client:
            yield client
        return
    n = default_workers(threads_per_task, on_gpu) if workers is None else workers
    if n < 1:
        raise Slice2VolError(f"--workers must be at least 1, got {n}")
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
