"""GaussianSVR (``--method gaussian``): the volume as a sum of 3D Gaussians, optimised jointly
with every slice's pose (arXiv 2601.22990), with the analytic-PSF renderer of Dannecker et al.

Modules: :mod:`.splat` (the truncated-Gaussian lattice kernel), :mod:`.model` (parameters,
initialisation, density control, files), :mod:`.render` (voxeliser and analytic slices),
:mod:`.optimise` (losses, schedule, the method).
"""
