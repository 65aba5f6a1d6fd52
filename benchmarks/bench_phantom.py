#!/usr/bin/env python
"""SVR on SVRTK's six motion-corrupted test stacks (no ground truth): slice consistency, time, memory, a picture.

Input (``--data``): ``svrtk_phantom/stacks/simulated-stack-d0..d5.nii.gz`` (thickness 2.5 mm) and
``mask-for-stack-2.nii.gz``, the 3D brain mask in stack d2's world frame, with d2 (index 2) as
the template -- the setting of SVRTK's own test::

    mirtk reconstruct out.nii.gz 6 simulated-stack-d*.nii.gz -template simulated-stack-d2.nii.gz \\
        -mask mask-for-stack-2.nii.gz -resolution 0.8 -thickness 2.5 (x6) -iterations 3 -svr_only

It calls ``methods.run.run_reconstruction`` exactly as ``slice2vol reconstruct STACKS --thickness 2.5
--mask mask-for-stack-2.nii.gz --template 2`` does, then prints

* slice consistency (SSIM / PSNR / NCC of acquired vs simulated slices) before -- the motion-blind
  PSF average at the header poses, ``evaluation.metrics.naive_consistency`` -- and after SVR
  (``metrics.slice_consistency`` of ``result.simulated``), overall and per stack;
* wall time of the reconstruction and the process's peak RSS (CUDA: peak allocated memory);

and writes into ``--output``: ``recon.nii.gz`` (cropped to the ROI, as the CLI writes it),
``naive.nii.gz`` and ``phantom_views.png`` (three orthogonal mid-slices of the naive average and
of the SVR result, for a look by eye) and ``results.json``.

    python benchmarks/bench_phantom.py --output bench_out/phantom
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _memory import peak_rss_mb, reset_peak_rss, status_mb

from slice2vol import io
from slice2vol.core.image import Volume
from slice2vol.core.runtime import resolve_device, seed_everything
from slice2vol.evaluation.metrics import naive_consistency, slice_consistency
from slice2vol.methods.naive import naive_baseline
from slice2vol.methods.run import crop_to_roi, run_reconstruction

DEFAULT_DATA = io.shared_data_dir()


def mid_slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal mid-slices of an (R, A, S)-axis-aligned volume: anterior/superior up,
    the patient's right on the right of the image (neurological convention)."""
    ci, cj, ck = (n // 2 for n in vol.shape)
    axial = vol[:, :, ck].T  # rows: A, cols: R
    coronal = vol[:, cj, :].T  # rows: S, cols: R
    sagittal = vol[ci, :, :].T  # rows: S, cols: A
    return [np.flipud(axial), np.flipud(coronal), np.flipud(sagittal)]


def save_views(volumes: list[tuple[str, Volume]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(volumes), 3, figsize=(11, 3.8 * len(volumes)), squeeze=False)
    for row, (name, vol) in enumerate(volumes):
        data = vol.data.cpu().numpy()
        vmax = float(np.percentile(data[data > 0], 99.5)) if (data > 0).any() else 1.0
        aspect = vol.resolution  # mm per voxel along i, j, k
        for col, (img, label, asp) in enumerate(zip(mid_slices(data), ("axial", "coronal", "sagittal"),
                                                     (aspect[1] / aspect[0], aspect[2] / aspect[0], aspect[2] / aspect[1]))):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=vmax, aspect=asp, interpolation="nearest")
            ax.set_title(f"{name}: {label}")
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(c: dict) -> str:
    return f"SSIM {c['ssim']:.3f}  PSNR {c['psnr']:6.2f} dB  NCC {c['ncc']:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="SVR on the SVRTK phantom stacks: consistency, time, memory, picture.")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (default: %(default)s)")
    ap.add_argument("--output", type=Path, default=Path("bench_out/phantom"), help="output folder (default: %(default)s)")
    ap.add_argument("--resolution", type=float, default=0.8)
    ap.add_argument("--iterations", type=int, default=None, help="SVR outer iterations (default: the method's)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    seed_everything(0)
    d = args.data / "svrtk_phantom" / "stacks"
    paths = [d / f"simulated-stack-d{i}.nii.gz" for i in range(6)]
    mask_path = d / "mask-for-stack-2.nii.gz"
    for p in paths + [mask_path]:
        if not p.exists():
            sys.exit(f"bench_phantom: {p} not found (give --data)")
    args.output.mkdir(parents=True, exist_ok=True)

    stacks = io.load_stacks(paths, [2.5])
    mask = Volume(torch.from_numpy(io.load_mask(mask_path)), io.load_nifti(mask_path, "mask")[1])
    print(f"slice2vol phantom benchmark: 6 SVRTK stacks "
          f"({', '.join('x'.join(map(str, st.slices.shape)) for st in stacks)} (N, H, W)), thickness 2.5 mm, "
          f"template 2, mask-for-stack-2; device {device}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    rss_before = status_mb("VmRSS")
    reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    prep, result, timings = run_reconstruction(stacks, resolution=args.resolution, method="svr", mask=mask, template=2,
                                               iterations=args.iterations, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    before = naive_consistency(prep)
    after = slice_consistency(prep.slices, result.simulated.detach())

    # outputs: the SVR result and the naive PSF average at header poses (as naive_consistency builds it)
    V0 = naive_baseline(prep).volume

    def roi_volume(data):
        v = crop_to_roi(Volume(data * prep.roi, prep.affine, prep.roi), prep.roi)
        return Volume(v.data.detach().float().cpu(), v.affine)

    recon, naive = roi_volume(result.volume.data), roi_volume(V0)
    io.save_volume(recon, args.output / "recon.nii.gz")
    io.save_volume(naive, args.output / "naive.nii.gz")
    png = args.output / "phantom_views.png"
    save_views([("naive (header poses)", naive), ("SVR", recon)], png,
               f"SVRTK phantom, 6 stacks -> {args.resolution:g} mm; slice SSIM {before['ssim']:.3f} -> {after['ssim']:.3f}")

    has_pixels = torch.zeros(prep.slices.n_slices, dtype=torch.bool, device=prep.slices.device)
    has_pixels[prep.slices.slice_id] = True
    excluded = int(((result.slice_weights < 0.5) & has_pixels).sum())  # as the CLI counts them
    print(f"reconstruction: {'x'.join(map(str, recon.shape))} voxels at {args.resolution:g} mm, "
          f"{prep.slices.n_slices} slices ({prep.slices.n_pixels:,} pixels), {excluded} excluded as outliers")
    print(f"time: {wall:.1f} s (prepare {timings['prepare_s']:.1f} s + SVR {timings['method_s']:.1f} s); "
          f"peak RSS {peak:.0f} MB (RSS before {rss_before:.0f} MB"
          + ("" if reset else "; whole-process peak, reset unavailable") + ")"
          + (f"; peak CUDA memory {gpu_peak:.0f} MB" if gpu_peak is not None else ""))
    print("slice consistency (acquired vs simulated slices):")
    print(f"  {'':<28} {'before (naive)':<44} after (SVR)")
    names = [st.name for st in prep.stacks]
    for name, b, a in zip(names, before["per_stack"], after["per_stack"]):
        print(f"  {name:<28} {_fmt(b):<44} {_fmt(a)}")
    print(f"  {'all':<28} {_fmt(before):<44} {_fmt(after)}")
    print(f"wrote {args.output / 'recon.nii.gz'}, naive.nii.gz, {png.name}, results.json")

    out = {"time_s": wall, "timings": timings, "peak_rss_mb": peak, "rss_before_mb": rss_before, "peak_rss_reset": reset,
           "gpu_peak_mb": gpu_peak, "device": str(device), "threads": torch.get_num_threads(),
           "shape": list(recon.shape), "slices": prep.slices.n_slices, "pixels": prep.slices.n_pixels,
           "excluded_slices": excluded, "template": prep.template,
           "consistency_before": {k: before[k] for k in ("ssim", "psnr", "ncc", "per_stack")},
           "consistency_after": {k: after[k] for k in ("ssim", "psnr", "ncc", "per_stack")}}
    (args.output / "results.json").write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
