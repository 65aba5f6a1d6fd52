"""Peak-memory helpers for the benchmarks (Linux ``/proc``, with a ``getrusage`` fallback).

All sizes are in MB (2**20 bytes).
"""
from __future__ import annotations

import resource

__all__ = ["status_mb", "reset_peak_rss", "peak_rss_mb"]


def status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field (e.g. ``VmRSS``, ``VmHWM``) in MB, or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process to its current RSS (Linux >= 4.0).

    Returns False where that is not possible; :func:`peak_rss_mb` then covers the process's life.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS in MB since the last :func:`reset_peak_rss` (VmHWM), else over the process's life."""
    hwm = status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
