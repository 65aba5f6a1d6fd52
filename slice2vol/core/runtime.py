"""Run-time settings shared by the commands: device choice, seeding, logging."""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

from slice2vol.errors import Slice2VolError

__all__ = ["resolve_device", "synchronize", "seed_everything", "setup_logging", "NOTICE"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error.

    Choosing CUDA also turns off TF32 in cuDNN's float32 convolutions (PyTorch allows it by
    default on Ampere and later): slice2vol's convolutions are small (Gaussian blurs, SSIM windows,
    cSVR's network), so tensor cores buy little, while the 10-bit mantissa moves SSIM (whose
    ``E[x^2] - mu^2`` cancels) by up to ~1e-2 against the CPU's float32 (measured on the CPU by
    rounding the operands as TF32 does).  The legacy flag is used because PyTorch refuses reads of
    it once the newer per-backend ``fp32_precision`` settings disagree with each other.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Slice2VolError("--device cuda was requested but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise Slice2VolError(f"unknown device {name!r} (use auto, cpu or cuda)")
    if name.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` when it is a CUDA device (CUDA runs asynchronously,
    so a timer read without this charges them to whatever comes next); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; CPU results are then deterministic for a fixed seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


#: Log level of what a command shows at normal verbosity without it being a warning (the thickness
#: used per stack, the template chosen): between INFO and WARNING, printed as ``slice2vol: ...``.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")


class _Formatter(logging.Formatter):
    """``slice2vol: LEVEL: message`` (a notice without its level name), or with ``verbose``
    ``LEVEL logger: message``."""

    def __init__(self, verbose: bool):
        super().__init__("%(levelname)s %(name)s: %(message)s" if verbose else "slice2vol: %(levelname)s: %(message)s")
        self._notice = None if verbose else logging.Formatter("slice2vol: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if self._notice is not None and record.levelno == NOTICE:
            return self._notice.format(record)
        return super().format(record)


def setup_logging(verbose: bool) -> None:
    """The CLI's logging: slice2vol's own loggers (``slice2vol.*``) at DEBUG with ``verbose``, else
    at :data:`NOTICE`; every other library (PIL, matplotlib, ...) stays at WARNING through the root
    logger, so ``--verbose`` shows slice2vol's details only."""
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter(verbose))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # no-op where logging is set up already
    logging.getLogger("slice2vol").setLevel(logging.DEBUG if verbose else NOTICE)
