"""Run-time settings shared by the commands: device choice, seeding, logging."""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

from .errors import Slice2VolError

__all__ = ["resolve_device", "seed_everything", "setup_logging"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Slice2VolError("--device cuda was requested but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise Slice2VolError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; CPU results are then deterministic for a fixed seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "slice2vol: %(levelname)s: %(message)s",
    )
    logging.getLogger("slice2vol").setLevel(logging.DEBUG if verbose else logging.WARNING)
