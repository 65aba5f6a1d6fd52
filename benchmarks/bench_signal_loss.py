#!/usr/bin/env python
"""Slices darkened by motion during their acquisition (signal loss): how the methods cope.

Fetal T2 slices are single-shot: a fetus that moves while a slice is acquired leaves it dark,
wholly or in a band (``SimulationConfig.signal_loss``, :func:`slice2vol.simulation.simulate.signal_loss_field`).
The simulator had no such artefact before, so nothing was tuned on it.  Per atlas: the benchmark's
3 orthogonal moderate-motion stacks (1 mm x 3 mm, 2 % noise; :func:`bench_selection._simulate`)
with a fraction of every stack's slices darkened (0 = the same stacks without loss; the loss is
drawn after everything else, so motion, noise and geometry are identical across fractions).
Reconstructed in this process, one torch thread, 0.8 mm, stack masks:

* ``auto`` -- the default pipeline: pixels darker than both neighbouring slices are left out
  (:func:`slice2vol.core.preprocess.signal_loss_pixels`), robust statistics reject the rest;
* ``auto, dark kept`` -- the same without that detection (``--keep-dark-pixels``; the default
  before 2026-12-07);
* ``auto, lost removed`` -- the lost slices taken out of the stack masks by the simulator's
  record: what knowing which slices are lost would give (band losses keep usable pixels, so
  the detection can beat it);
* ``gaussian`` -- GaussianSVR (default: detection, and the start's robust weights weight its losses);
* ``gaussian, before`` -- GaussianSVR without either (``--keep-dark-pixels``,
  ``start_weights=False``): every pixel counts, as before 2026-12-07.

PSNR / SSIM: ``compare_volumes(recon, gt, align=True, scale=True)`` as ``slice2vol demo``.

    python benchmarks/bench_signal_loss.py --atlases validation               # the tuning check
    python benchmarks/bench_signal_loss.py | tee benchmarks/results/signal_loss_cpu.txt   # test atlases
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import _load_atlas, _simulate, add_atlas_arguments, machine, setup  # noqa: E402

VARIANTS = ("auto", "auto-kept", "auto-oracle", "gaussian", "gaussian-before")
LABELS = {"auto": "auto", "auto-kept": "auto, dark kept", "auto-oracle": "auto, lost removed", "gaussian": "gaussian",
          "gaussian-before": "gaussian, before"}
#: pairs (variant, its comparison) summarised at the end
PAIRS = (("auto", "auto-kept"), ("gaussian", "gaussian-before"), ("auto", "auto-oracle"))


def simulate(volume, seed: int, fraction: float):
    """The benchmark's 3 orthogonal moderate stacks with ``fraction`` of their slices dark."""
    return _simulate(volume, "moderate", seed, signal_loss=fraction)


def run(stacks, variant: str, gt) -> dict:
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.evaluation.quality import slice_counts
    from slice2vol.methods.run import crop_to_roi, run_reconstruction

    method = "gaussian" if variant.startswith("gaussian") else "auto"
    options = {"start_weights": False} if variant == "gaussian-before" else {}
    detect = variant not in ("auto-kept", "gaussian-before")
    t0 = time.perf_counter()
    prep, res, _ = run_reconstruction(stacks, method=method, have_stack_masks=True, progress=False, options=options,
                                      detect_signal_loss=detect)
    wall = time.perf_counter() - t0
    rec = crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX)
    m = compare_volumes(rec, gt, align=True, scale=True)
    counts = slice_counts(prep.slices, res.slice_weights)
    lost = sum(int(st.mask.sum()) for st in stacks) - sum(int(st.mask.sum()) for st in prep.stacks)
    return {"psnr": float(m["psnr"]), "ssim": float(m["ssim"]), "time_s": wall, "excluded": counts["excluded"],
            "with_pixels": counts["with_pixels"], "left_out": lost}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.15, 0.3])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args(argv)
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.methods.run import crop_to_roi

    data, atlases = setup(args)
    print(f"signal loss: atlases {', '.join(atlases)}, seed {args.seed}, fractions {args.fractions}; 3 moderate stacks, "
          f"0.8 mm, 1 torch thread; {machine()}", flush=True)
    print("lost: fraction of every stack's slices darkened; excluded: slices (with pixels) robust statistics excluded; "
          "left out: pixels the detection took out of the masks")
    print(f"{'atlas':<18} {'lost':>5} {'variant':<21} {'PSNR':>6} {'SSIM':>6} {'excluded':>9} {'left out':>8} {'time s':>6}",
          flush=True)
    rows = []
    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for frac in args.fractions:
            sim = simulate(vol, args.seed, frac)
            lost = sim.params.artefacts.signal_loss
            for variant in args.variants:
                stacks = sim.stacks
                if variant == "auto-oracle":
                    if frac == 0:
                        continue
                    stacks = []
                    for st, losses in zip(sim.stacks, lost):
                        m = st.mask.clone()
                        m[[d["slice"] for d in losses]] = False
                        stacks.append(replace(st, mask=m))
                r = run(stacks, variant, gt)
                rows.append((atlas, frac, variant, r))
                print(f"{atlas:<18} {frac:>5.2f} {LABELS[variant]:<21} {r['psnr']:>6.2f} {r['ssim']:>6.3f} "
                      f"{r['excluded']:>4}/{r['with_pixels']:<4} {r['left_out']:>8} {r['time_s']:>6.0f}", flush=True)
    print("\nmean PSNR dB (SSIM) per fraction of lost slices; change against the same variant without loss")
    clean = {(a, v): r["psnr"] for a, f, v, r in rows if f == 0}
    for frac in args.fractions:
        for variant in args.variants:
            sel = [(a, r) for a, f, v, r in rows if f == frac and v == variant]
            if not sel:
                continue
            ps = np.array([r["psnr"] for _, r in sel])
            ss = np.array([r["ssim"] for _, r in sel])
            base = [r["psnr"] - clean[(a, "auto" if variant == "auto-oracle" else variant)] for a, r in sel
                    if (a, "auto" if variant == "auto-oracle" else variant) in clean]
            d = f"{np.mean(base):+.2f} [{min(base):+.2f}, {max(base):+.2f}]" if base and frac > 0 else ""
            print(f"  {frac:>4.2f} {LABELS[variant]:<21} {ps.mean():6.2f} +- {ps.std():.2f} ({ss.mean():.3f})  {d}")
    for a_, b_ in PAIRS:
        for frac in args.fractions:
            dd = [r["psnr"] - g["psnr"] for a, f, v, r in rows if v == a_ and f == frac
                  for a2, f2, v2, g in rows if v2 == b_ and a2 == a and f2 == f]
            if dd:
                print(f"{LABELS[a_]} - {LABELS[b_]} at {frac:.2f} lost: {np.mean(dd):+.2f} dB "
                      f"[{min(dd):+.2f}, {max(dd):+.2f}], better in {sum(x > 0 for x in dd)}/{len(dd)}")
    print(f"load average {os.getloadavg()[0]:.2f} now")
    return 0


if __name__ == "__main__":
    sys.exit(main())
