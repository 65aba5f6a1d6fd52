"""cSVR: fast multi-stack slice-to-volume registration by a multi-scale unrolled network
(Firenze et al., "Fast Multi-Stack Slice-to-Volume Reconstruction via Multi-Scale Unrolled
Optimization"), see :mod:`.network` for the architecture, :mod:`.inputs` for the input
normalisation, :mod:`slice2vol.training.csvr` for training and :mod:`.infer` for :func:`register_csvr`.
"""
from __future__ import annotations

__all__ = ["register_csvr", "load_model", "CSVRNet", "CSVRConfig"]


def __getattr__(name):  # lazy: importing the package must not load torch models or data
    if name in ("register_csvr", "load_model"):
        from slice2vol.methods.csvr import infer
        return getattr(infer, name)
    if name in ("CSVRNet", "CSVRConfig"):
        from slice2vol.methods.csvr import network
        return getattr(network, name)
    raise AttributeError(name)
