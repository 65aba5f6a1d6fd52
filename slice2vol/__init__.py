"""slice2vol: slice-to-volume reconstruction of motion-corrupted stacks of thick 2D MRI slices.

Layers, each importing only from those before it: :mod:`slice2vol.errors`, :mod:`slice2vol.core`
(the mathematics), :mod:`slice2vol.io`, :mod:`slice2vol.simulation`, :mod:`slice2vol.methods`,
:mod:`slice2vol.evaluation`, :mod:`slice2vol.training`, :mod:`slice2vol.report`, :mod:`slice2vol.cli`.
"""

__version__ = "0.1.0"
