"""slice2vol: slice-to-volume reconstruction of motion-corrupted stacks of thick 2D MRI slices."""

__version__ = "0.1.0"
