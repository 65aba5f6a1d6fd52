"""Peak-memory helpers for the benchmark scripts: re-exported from :mod:`slice2vol.core.memory` (one copy)."""
from __future__ import annotations

from slice2vol.core.memory import peak_rss_mb, reset_peak_rss, status_mb

__all__ = ["status_mb", "reset_peak_rss", "peak_rss_mb"]
