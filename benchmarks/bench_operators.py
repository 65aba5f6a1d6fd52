#!/usr/bin/env python
"""Throughput of the acquisition operators (forward, adjoint, Projector, forward_jacobian) against a
memory-bandwidth bound, for the PyTorch reference path and the fused numba path in one run.

Realistic case (defaults): a 0.8 mm volume of 140 x 160 x 140 voxels, three orthogonal stacks of
110 x 110 pixels x 40 slices (1 mm in-plane, 3 mm thick) whose brain mask is an ellipsoid, the
default PSF (``psf_kernel(..., quality="normal")``).  For every operator the table gives PSF
samples/s and pixels/s, and beside them a physical estimate:

* the machine's memory bandwidth is measured with a large tensor copy (bytes read + written);
* a trilinear sample of the forward operator reads 8 voxels (4 B each) and its 3 coordinates
  (12 B): ``44 B/sample`` if every voxel read misses the caches (pessimistic: neighbouring
  samples share cache lines and the volume, 12.5 MB, may partly fit in the last-level cache);
  the adjoint reads *and* writes 8 voxels plus the coordinates and a value: ``80 B/sample``;
* the streaming bound counts only what cannot be cached (coordinates, weight, value:
  ``~20 B/sample``), the bound if every voxel access hit the cache.

Every operator is timed on both implementations of :mod:`slice2vol.core.acquisition` (``torch``:
``SLICE2VOL_NO_NUMBA=1``; ``numba``: the fused kernels of :mod:`slice2vol.core.fused`), in the same
process, so the "vs torch" column is a ratio measured under the same machine load.  Registration
rows: ``forward_jacobian`` (the simulated pixels and their 6 pose derivatives from a 4-channel
volume, what one registration step evaluates) and ``register`` (one level of 4 Levenberg-Marquardt
iterations end to end) on what SVR registers (every 2nd pixel, PSF at twice the voxel size).
The 4-channel read is ``8 x 16 B`` per sample, hence its own DRAM bound.

"% of bound" is measured / bound throughput: near 100 % of the DRAM bound means memory-bound,
far below the streaming bound means compute- or latency-bound (the usual case for
``grid_sample`` on CPU, and for its backward, which scatters serially on CPU).  As a direct check,
the ``16^3 vol`` rows read the same samples from a 16 KB volume that always stays in cache.
Throughput is computed from the best of several calls (the median is printed beside it): on a
shared machine the slower calls measure the neighbours' load.

    python benchmarks/bench_operators.py                    # CPU (and CUDA if available), both paths
    python benchmarks/bench_operators.py --device cpu --repeat 3 --json out.json
    python benchmarks/bench_operators.py --path numba       # the fused path only
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from slice2vol.core import acquisition as acq
from slice2vol.core import fused
from slice2vol.core.geometry import stack_slice_poses
from slice2vol.core.image import SliceSet, Stack
from slice2vol.core.registration import gradient_channels, register, slice_centres
from slice2vol.core.transforms import rotation_about
from slice2vol.simulation.simulate import orientation_rotation

# Bytes per PSF sample assumed by the bounds (float32 data, see module doc).
FWD_DRAM_BYTES = 8 * 4 + 3 * 4  # 8 voxel reads + coordinates
ADJ_DRAM_BYTES = 8 * 4 * 2 + 3 * 4 + 4  # 8 voxel read-modify-writes + coordinates + value
FWD_STREAM_BYTES = 3 * 4 + 4 + 4  # coordinates + weight + sample written
ADJ_STREAM_BYTES = 3 * 4 + 4 + 4  # coordinates + weight + value
FJ_DRAM_BYTES = 8 * 4 * 4 + 3 * 4  # 8 corners x 4 channels (V, gradient) + coordinates
FJ_STREAM_BYTES = 3 * 4 + 4 + 4  # coordinates + weight + sample written


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, repeat: int, min_time: float) -> tuple[float, float, int]:
    """Best and median seconds per call over at least ``repeat`` calls and ``min_time`` seconds
    (after one warm-up).  The best call is the figure of merit: on a shared machine the others
    measure the neighbours as much as the code."""
    fn()
    sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - t_start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), len(times)


def memory_bandwidth(device: torch.device, mbytes: int = 256, repeat: int = 5) -> dict:
    """Copy bandwidth (GB/s, read + write counted) of a large float32 tensor copy, and numpy's on CPU."""
    n = mbytes * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t, _, _ = timeit(lambda: dst.copy_(src), device, repeat, 0.5)
    out = {"torch_copy_GBps": 2 * n * 4 / t / 1e9, "bytes": n * 4}
    if device.type == "cpu":
        a = np.random.rand(n).astype(np.float32)
        b = np.empty_like(a)
        t_np, _, _ = timeit(lambda: np.copyto(b, a), device, repeat, 0.5)
        out["numpy_copy_GBps"] = 2 * n * 4 / t_np / 1e9
    del src, dst
    return out


def make_case(shape=(140, 160, 140), res=0.8, stack_hw=(110, 110), n_slices=40, spacing=1.0, thickness=3.0,
              mask_radii=(45.0, 55.0, 42.0), device="cpu", seed=0):
    """A smooth random volume and three orthogonal stacks with an ellipsoidal brain mask."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand((1, 1) + tuple(s // 8 for s in shape), generator=g)
    vol = torch.nn.functional.interpolate(small, size=shape, mode="trilinear", align_corners=True)[0, 0] * 1000
    affine = np.diag([res, res, res, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * res  # centred on the world origin
    stacks = []
    H, W = stack_hw
    for name in ("axial", "coronal", "sagittal"):
        R = orientation_rotation(name)
        A = np.eye(4)
        A[:3, :3] = R * np.array([spacing, spacing, thickness])
        A[:3, 3] = -A[:3, :3] @ ((np.array([H, W, n_slices]) - 1) / 2)
        poses, sp, _ = stack_slice_poses(A, (H, W, n_slices))
        # pixel world positions -> ellipsoidal mask
        i, j, k = np.meshgrid(np.arange(H), np.arange(W), np.arange(n_slices), indexing="ij")
        world = np.stack([i, j, k], -1) @ A[:3, :3].T + A[:3, 3]
        inside = ((world / np.asarray(mask_radii)) ** 2).sum(-1) <= 1
        mask = torch.from_numpy(np.moveaxis(inside, 2, 0).copy())
        slices = torch.rand((n_slices, H, W), generator=g) * 1000
        stacks.append(Stack(slices=slices, mask=mask, poses=poses, spacing=sp, thickness=thickness, affine=A,
                            index=np.arange(n_slices), name=name))
    ss = SliceSet.from_stacks(stacks, device=device)
    return vol.to(device), affine, ss


@contextlib.contextmanager
def operator_path(name: str):
    """Run the block on the ``torch`` (reference) or ``numba`` (fused) path of slice2vol.core.acquisition."""
    old = os.environ.get(fused.ENV_DISABLE)
    os.environ[fused.ENV_DISABLE] = "1" if name == "torch" else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(fused.ENV_DISABLE, None)
        else:
            os.environ[fused.ENV_DISABLE] = old


def registration_case(vol, affine, ss, seed=1):
    """What SVR's registration sees: every 2nd pixel, the PSF at twice the voxel size, slices whose
    acquired values were simulated at poses 2 deg / 1.5 mm (rms) away from the current ones."""
    g = torch.Generator().manual_seed(seed)
    sub = torch.arange(ss.n_pixels, device=ss.device) % 2 == 0
    coords, sid = ss.coords[sub], ss.slice_id[sub]
    psf_reg = acq.psf_kernel(ss.spacing, ss.thickness, 1.6)
    centres = slice_centres(ss.poses, coords, sid)
    M = ss.n_slices
    d = torch.cat([torch.randn(M, 3, generator=g) * np.deg2rad(2.0) / np.sqrt(3),
                   torch.randn(M, 3, generator=g) * 1.5 / np.sqrt(3)], 1).to(ss.device)
    true = rotation_about(d, centres) @ ss.poses
    with torch.no_grad():
        y = acq.forward(vol, affine, true, coords, sid, psf_reg)
    return coords, sid, y, psf_reg, centres


def run(device: torch.device, args) -> dict:
    vol, affine, ss = make_case(device=device)
    shape = tuple(vol.shape)
    psf = acq.psf_kernel(ss.spacing, ss.thickness, 0.8)
    K_used = int((psf.weights[0] > 0).sum())
    P = ss.n_pixels
    samples = P * psf.n_samples
    y = ss.values
    bw = memory_bandwidth(device)
    bw_best = max(v for k, v in bw.items() if k.endswith("GBps"))
    paths = ["torch"] + (["numba"] if device.type == "cpu" and fused.available() else [])
    if args.path != "both":
        paths = [p for p in paths if p == args.path]
        if not paths:
            sys.exit(f"bench_operators: path {args.path} is not available on {device} ({fused.reason_unavailable()})")
    res = {"device": str(device), "volume": list(shape), "pixels": P, "slices": ss.n_slices, "psf_samples": psf.n_samples,
           "psf_samples_used": K_used, "bandwidth": bw, "threads": torch.get_num_threads(), "paths": paths, "ops": [],
           "numba_unavailable": fused.reason_unavailable() if device.type == "cpu" else "not a CPU device"}

    # Reference: the same samples read from a 16^3 volume covering the same world box (16 KB, always
    # in L1/L2): what the operators cost when memory is not in the way.
    small_shape = (16, 16, 16)
    small_vol = torch.nn.functional.interpolate(vol[None, None], size=small_shape, mode="trilinear",
                                                align_corners=True)[0, 0].contiguous()
    small_aff = affine.copy()
    small_aff[:3, :3] = affine[:3, :3] * ((np.asarray(shape) - 1) / (np.asarray(small_shape) - 1))

    r_coords, r_sid, r_y, psf_reg, r_centres = registration_case(vol, affine, ss)
    r_samples = int(r_coords.shape[0]) * psf_reg.n_samples
    channels, _ = gradient_channels(vol, affine)
    res["registration"] = {"pixels": int(r_coords.shape[0]), "psf_samples": psf_reg.n_samples}

    baseline = {}
    for path in paths:
        with operator_path(path):
            if path == "numba":  # first call in this process: numba's cache load, or the JIT compile
                t0 = time.perf_counter()
                acq.forward(vol, affine, ss.poses, ss.coords, ss.slice_id, psf)
                acq.adjoint(y, shape, affine, ss.poses, ss.coords, ss.slice_id, psf)
                acq.forward_jacobian(channels, affine, ss.poses, r_coords, r_sid, psf_reg, r_centres)
                res["numba_first_calls_seconds"] = time.perf_counter() - t0
            t_build = time.perf_counter()
            proj = acq.Projector(shape, affine, ss.poses, ss.coords, ss.slice_id, psf)
            sync(device)
            res[f"projector_build_seconds_{path}"] = time.perf_counter() - t_build
            centres_sl = r_centres  # one centre per slice (slice_centres default grouping)
            ops = [
                ("forward", lambda: acq.forward(vol, affine, ss.poses, ss.coords, ss.slice_id, psf), samples,
                 FWD_DRAM_BYTES, FWD_STREAM_BYTES),
                ("forward, 16^3 vol", lambda: acq.forward(small_vol, small_aff, ss.poses, ss.coords, ss.slice_id, psf),
                 samples, FWD_DRAM_BYTES, FWD_STREAM_BYTES),
                ("adjoint", lambda: acq.adjoint(y, shape, affine, ss.poses, ss.coords, ss.slice_id, psf), samples,
                 ADJ_DRAM_BYTES, ADJ_STREAM_BYTES),
                ("adjoint, 16^3 vol", lambda: acq.adjoint(y, small_shape, small_aff, ss.poses, ss.coords, ss.slice_id, psf),
                 samples, ADJ_DRAM_BYTES, ADJ_STREAM_BYTES),
                ("Projector.forward", lambda: proj.forward(vol), samples, FWD_DRAM_BYTES, FWD_STREAM_BYTES),
                ("Projector.adjoint", lambda: proj.adjoint(y), samples, ADJ_DRAM_BYTES, ADJ_STREAM_BYTES),
                ("forward_jacobian", lambda: acq.forward_jacobian(channels, affine, ss.poses, r_coords, r_sid, psf_reg,
                                                                  centres_sl), r_samples, FJ_DRAM_BYTES, FJ_STREAM_BYTES),
                ("register, 4 LM its", lambda: register(vol, affine, ss.poses, r_coords, r_sid, r_y, psf_reg, sigmas=(0.0,),
                                                        iterations=4), r_samples, None, None),
            ]
            with torch.no_grad():
                for name, fn, n_samp, dram_b, stream_b in ops:
                    t, t_med, n = timeit(fn, device, args.repeat, args.min_time)
                    row = {"op": name, "path": path, "seconds": t, "median_seconds": t_med, "calls": n, "samples": n_samp}
                    if dram_b is not None:
                        sps = n_samp / t
                        dram_bound = bw_best * 1e9 / dram_b
                        stream_bound = bw_best * 1e9 / stream_b
                        row.update({"samples_per_s": sps, "pixels_per_s": (P if n_samp == samples else r_coords.shape[0]) / t,
                                    "dram_bound_samples_per_s": dram_bound, "dram_bound_fraction": sps / dram_bound,
                                    "stream_bound_samples_per_s": stream_bound, "stream_bound_fraction": sps / stream_bound,
                                    "effective_GBps_at_dram_model": sps * dram_b / 1e9})
                    if path == "torch":
                        baseline[name] = t
                    if name in baseline:
                        row["speedup_vs_torch"] = baseline[name] / t
                    res["ops"].append(row)
    return res


def print_table(r: dict) -> None:
    bw = r["bandwidth"]
    print(f"\n== {r['device']} ({r['threads']} threads): volume {'x'.join(map(str, r['volume']))} @ 0.8 mm, "
          f"{r['pixels']:,} masked pixels in {r['slices']} slices, PSF {r['psf_samples']} samples/pixel "
          f"({r['psf_samples_used']} non-zero) -> {r['pixels'] * r['psf_samples']:,} samples per call")
    print(f"registration rows: every 2nd pixel ({r['registration']['pixels']:,}), PSF at 1.6 mm "
          f"({r['registration']['psf_samples']} samples/pixel), 4-channel volume (V and its gradient)")
    bws = ", ".join(f"{k.replace('_GBps', '')} {v:.1f} GB/s" for k, v in bw.items() if k.endswith("GBps"))
    print(f"memory bandwidth (read+write of a {bw['bytes'] / 2**20:.0f} MiB copy): {bws}")
    print(f"bounds: forward {FWD_DRAM_BYTES} B/sample (DRAM, 8 voxels + coords), {FWD_STREAM_BYTES} B/sample (streaming); "
          f"adjoint {ADJ_DRAM_BYTES} / {ADJ_STREAM_BYTES}; forward_jacobian {FJ_DRAM_BYTES} / {FJ_STREAM_BYTES} B/sample")
    print(f"paths: {', '.join(r['paths'])}" + ("" if "numba" in r["paths"] else f" (numba: {r['numba_unavailable']})"))
    hdr = (f"{'operator':<19} {'path':<6} {'ms best':>8} {'median':>7} {'Msamples/s':>11} {'Mpixels/s':>10} "
           f"{'eff. GB/s':>10} {'DRAM bound':>11} {'% DRAM':>7} {'% stream':>8} {'vs torch':>9}")
    print(hdr)
    print("-" * len(hdr))
    for o in r["ops"]:
        sp = f"{o['speedup_vs_torch']:>8.1f}x" if "speedup_vs_torch" in o and o["path"] != "torch" else f"{'':>9}"
        if "samples_per_s" in o:
            print(f"{o['op']:<19} {o['path']:<6} {1e3 * o['seconds']:>8.1f} {1e3 * o['median_seconds']:>7.1f} "
                  f"{o['samples_per_s'] / 1e6:>11.1f} {o['pixels_per_s'] / 1e6:>10.2f} "
                  f"{o['effective_GBps_at_dram_model']:>10.2f} {o['dram_bound_samples_per_s'] / 1e6:>9.0f} M {100 * o['dram_bound_fraction']:>6.1f}% "
                  f"{100 * o['stream_bound_fraction']:>7.1f}% {sp}")
        else:
            print(f"{o['op']:<19} {o['path']:<6} {1e3 * o['seconds']:>8.1f} {1e3 * o['median_seconds']:>7.1f} "
                  f"{'':>11} {'':>10} {'':>10} {'':>11} {'':>7} {'':>8} {sp}")
    for path in r["paths"]:
        print(f"Projector construction ({path}): {1e3 * r[f'projector_build_seconds_{path}']:.0f} ms")
    if "numba_first_calls_seconds" in r:
        print(f"first numba calls in this process (forward + adjoint + forward_jacobian: numba's on-disk cache load, "
              f"or the JIT compile when the cache is cold): {r['numba_first_calls_seconds']:.2f} s")
    print("Throughput is from the best call (median beside it). '16^3 vol' rows read the same samples from a "
          "16 KB volume that stays in cache: if the full-size rows match them, memory is not the bottleneck. "
          "'register' is one registration level (no smoothing) of 4 Levenberg-Marquardt iterations, "
          "the first evaluation and 3 trial steps by forward_jacobian, the last trial by forward alone (its Jacobian is never used), plus the costs and normal equations.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Throughput of slice2vol's forward/adjoint operators.")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CPU, and CUDA too when available (default: auto)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per operator at least (default: 3)")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per operator at least (default: 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--path", default="both", choices=["both", "torch", "numba"],
                    help="operator implementation(s) to time on CPU: the PyTorch reference, the fused numba kernels, "
                         "or both in one run (default: both; CUDA always runs the torch path)")
    ap.add_argument("--json", help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            sys.exit("bench_operators: --device cuda but CUDA is not available")
        devices.append(torch.device("cuda"))
    print(f"slice2vol operator benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.2f}"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    results = []
    for d in devices:
        r = run(d, args)
        print_table(r)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
