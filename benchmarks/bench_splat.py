#!/usr/bin/env python
"""GaussianSVR's splat kernel (slice2vol.methods.gaussian.splat): numba kernels vs the PyTorch path.

Times one forward and one backward (all three gradients) of ``splat`` on the two lattices the
method uses, sized like the default run on the STA29 moderate-motion case (recorded from that run):
60,000 Gaussians on its 107 x 128 x 111 voxel grid (the fit to the initial volume), and 300,000
Gaussian-slice pairs on the pixel planes of 86 slices of 115 x 99 pixels (the analytic-PSF
renderer), with the box half-widths of that run (3 to 8 voxels, mostly 4 and 5).  Prints the best
of ``--repeat`` calls per path and the ratio, for the support the renderers use (cut 9:
each Gaussian's 3-sigma ellipsoid inside its box) and, as a reference, for the whole box
(``inf``, what the kernels evaluated before 2026-12-03 evening); ``--cuts 9`` times only the
first.  Issue 13 item 2: the kernels
must run without a compiler on the user's machine (numba) and fall back to PyTorch.

    python benchmarks/bench_splat.py [--threads 2] [--repeat 3] [--cuts 9 inf]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from slice2vol.methods.gaussian import splat as splat_mod


def lattice_case(dims: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if dims == 3:
        J, shape = 60_000, (107, 128, 111)
        hist = {3: 11701, 4: 42977, 5: 4156, 6: 1101, 7: 111, 8: 4}  # box half-widths of that run
    else:
        J, shape = 300_000, (86 * 115, 99, 1)  # the slices' pixel planes stacked along i
        hist = {3: 21071, 4: 167418, 5: 108159, 6: 11786, 7: 1438, 8: 191}
    r_max = max(hist)
    pad = [shape[0] + 2 * r_max, shape[1] + 2 * r_max, shape[2] + 2 * r_max if dims == 3 else 1]
    strides = torch.tensor([pad[1] * pad[2], pad[2], 1])
    span = torch.tensor([shape[0] - 1, shape[1] - 1, (shape[2] - 1) if dims == 3 else 0], dtype=torch.float32)
    centre = r_max + torch.rand(J, 3, generator=g) * span
    if dims == 2:
        centre[:, 2] = torch.randn(J, generator=g)  # plane distance (voxels)
    L = torch.randn(J, 3, 3, generator=g) * 0.5
    prec = L @ L.transpose(1, 2) + 0.4 * torch.eye(3)
    amp = torch.rand(J, generator=g)
    radii = torch.tensor(list(hist), dtype=torch.long)
    p = torch.tensor(list(hist.values()), dtype=torch.float64)
    rad = radii[torch.multinomial(p / p.sum(), J, replacement=True, generator=g)]
    rc = torch.round(centre)
    if dims == 2:
        rc[:, 2] = 0
    base = (rc.long() * strides).sum(1)
    return centre, prec, amp, rad, base, strides.expand(J, 3).contiguous(), int(np.prod(pad))


def time_path(case, dims: int, compiled: bool, repeat: int, cut: float) -> tuple[float, float]:
    centre, prec, amp, rad, base, strides, size = case
    saved = splat_mod.compiled_kernels
    if not compiled:
        splat_mod.compiled_kernels = lambda: None
    try:
        w = torch.rand(size)
        fwd, bwd = [], []
        for _ in range(repeat + 1):  # the first call loads numba's cache (or compiles)
            c, p, a = (t.clone().requires_grad_(True) for t in (centre, prec, amp))
            t0 = time.perf_counter()
            out = splat_mod.splat(c, p, a, rad, base, strides, size, dims=dims, cut=cut)
            t1 = time.perf_counter()
            torch.autograd.grad((out * w).sum(), (c, p, a))
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        return min(fwd[1:]), min(bwd[1:])
    finally:
        splat_mod.compiled_kernels = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cuts", type=float, nargs="+", default=[9.0, float("inf")],
                    help="supports q <= cut to time (default: 9, the renderers' 3-sigma ellipsoid, and inf, the whole box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"slice2vol splat kernel benchmark: {args.threads} thread(s), torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; compiled kernels: "
          f"{'numba' if splat_mod.compiled_kernels() is not None else 'unavailable'}")
    print(f"{'lattice':<28} {'support':<10} {'path':<8} {'forward ms':>11} {'backward ms':>12} {'total x':>8}")
    for dims, label in ((3, "volume 107x128x111, 60k G"), (2, "86 slices 115x99, 300k G")):
        case = lattice_case(dims)
        for cut in args.cuts:
            support = "box" if cut == float("inf") else f"q <= {cut:g}"
            ref = time_path(case, dims, False, args.repeat, cut)
            rows = [("pytorch", ref)]
            if splat_mod.compiled_kernels() is not None:
                rows.append(("numba", time_path(case, dims, True, args.repeat, cut)))
            for name, (f, b) in rows:
                print(f"{label:<28} {support:<10} {name:<8} {1e3 * f:11.1f} {1e3 * b:12.1f} {sum(ref) / (f + b):8.1f}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
