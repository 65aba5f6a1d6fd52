"""Where a run's time goes: a light, always-on timer of the pipeline's stages.

Functions of the shared core are marked with :func:`timed` (``"registration"``,
``"reconstruction"``, ``"robust"``, ``"pose search"``); nested stages are counted exclusively
(a registration inside the pose search is registration time, not pose-search time), so the
stages add up to at most the wall time.  The cost is two ``perf_counter`` calls per stage call.
``slice2vol reconstruct --profile`` prints the totals (:func:`snapshot`) beside the CLI's own
prepare / selection / checks timings.  On CUDA, :func:`reset` with ``sync=True`` makes each
stage wait for the device so that asynchronous kernels are charged to the stage that queued them.
"""
from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager

import torch

__all__ = ["stage", "timed", "reset", "snapshot"]

_state = threading.local()


def _st():
    if not hasattr(_state, "totals"):
        _state.totals, _state.calls, _state.stack, _state.sync = {}, {}, [], False
    return _state


def reset(sync: bool = False) -> None:
    """Forget the totals of this thread; ``sync``: synchronise CUDA at stage boundaries."""
    s = _st()
    s.totals, s.calls, s.stack, s.sync = {}, {}, [], bool(sync and torch.cuda.is_available())


def snapshot() -> dict[str, dict[str, float]]:
    """``{stage: {"seconds": exclusive seconds, "calls": n}}`` since the last :func:`reset`."""
    s = _st()
    return {k: {"seconds": v, "calls": s.calls[k]} for k, v in s.totals.items()}


@contextmanager
def stage(name: str):
    """Charge the time spent in the block (minus nested stages) to ``name``."""
    s = _st()
    if s.sync:
        torch.cuda.synchronize()
    frame = [time.perf_counter(), 0.0]  # start, time of nested stages
    s.stack.append(frame)
    try:
        yield
    finally:
        if s.sync:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - frame[0]
        s.stack.pop()
        if s.stack:
            s.stack[-1][1] += elapsed
        s.totals[name] = s.totals.get(name, 0.0) + elapsed - frame[1]
        s.calls[name] = s.calls.get(name, 0) + 1


def timed(name: str):
    """Decorator: every call of the function is a :func:`stage` ``name``."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with stage(name):
                return fn(*args, **kwargs)
        return inner
    return wrap
