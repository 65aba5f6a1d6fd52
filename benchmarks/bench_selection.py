#!/usr/bin/env python
"""Stack assessment and selection (issue 14, item 3; :mod:`slice2vol.methods.selection`).

Per atlas: 3 good stacks (axial, coronal, sagittal, 1 mm x 3 mm, moderate motion, 2% noise, the
benchmark's simulation) and a fourth, bad, axial stack of each kind:

* ``other``: a stack simulated from another atlas (moderate motion), moved so that its brain
  centre is the case's brain centre (the same field of view): another fetus;
* ``extreme``: a stack of the same atlas with ``extreme`` motion (random walk with jumps, random
  1-4 packages, tilted) while the others are moderate;
* ``noise``: pure noise, ``|N(0, s)|`` with ``s`` the mean brain intensity, in the geometry and
  mask of a moderate axial stack of the same atlas.

Each bad case is reconstructed by ``slice2vol reconstruct`` (default method ``auto``, stack
masks, 0.8 mm, one torch thread, its own process) with the default selection and with
``--keep-all-stacks``; the 3 good stacks alone are reconstructed once per atlas (the run
"without the bad stack"; with the default selection, which must drop nothing).  PSNR:
``compare_volumes(recon, gt, align=True, scale=True)`` as ``slice2vol demo``.  Good cases at every
motion level (3 stacks all at one level; and 4 stacks, a moderate axial re-scan added) are only
assessed (:func:`~slice2vol.methods.selection.assess_stacks`; no reconstruction needed): the
count of dropped stacks must be 0.

    python benchmarks/bench_selection.py --atlases validation --assess-only    # tuning (validation atlases)
    python benchmarks/bench_selection.py | tee benchmarks/results/selection_cpu.txt   # the report (test atlases)

The other atlas of a test atlas is the test atlas 6 places further in ``TEST_ATLASES`` (6-8
weeks of gestation apart); of a validation / training atlas the next one of its list.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_TEST = ("GA21_notoperated", "GA24_notoperated", "GA25_operated", "GA28_operated", "GA30_operated",
                "GA33_operated")
BAD_KINDS = ("other", "extreme", "noise")
GOOD_LEVELS = ("mild", "moderate", "severe", "extreme")


def other_atlas(atlas: str) -> str:
    from slice2vol.simulation.splits import SPLITS

    for names in SPLITS.values():
        if atlas in names:
            step = 6 if names is SPLITS["test"] else 1
            return names[(names.index(atlas) + step) % len(names)]
    raise SystemExit(f"bench_selection: {atlas} is in no split")


def add_atlas_arguments(p: argparse.ArgumentParser) -> None:
    """The options :func:`setup` reads: ``--atlases`` (default: the 6 test atlases) and ``--data``."""
    p.add_argument("--atlases", nargs="+", default=list(DEFAULT_TEST), help="atlases or a split name (default: 6 test atlases)")
    p.add_argument("--data", type=Path, default=None, help="shared data folder (default: ../shared/data or $SLICE2VOL_SHARED)")


def setup(args) -> tuple[Path, list[str]]:
    """The atlas benchmarks' common start: one torch thread, the shared data folder (``args.data``
    or the default) and ``args.atlases`` with split names expanded."""
    from slice2vol.io import shared_data_dir
    from slice2vol.simulation.splits import expand_atlases

    torch.set_num_threads(1)
    return args.data or shared_data_dir(), expand_atlases(args.atlases)


def machine() -> str:
    """``"<cpu>, <n> CPUs, torch <version>, load average <1 min>"`` for a benchmark's header line."""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.2f}")


def paired_change(d) -> str:
    """``"mean [min, max], better / worse of n"`` of paired differences ``d`` (dB; better / worse:
    above +0.05 / below -0.05), the summary line of the A/B benchmarks."""
    return (f"{np.mean(d):+.2f} [{min(d):+.2f}, {max(d):+.2f}], "
            f"{sum(x > 0.05 for x in d)} / {sum(x < -0.05 for x in d)} of {len(d)}")


def run_switched(stacks, gt, method: str, module, name: str, value):
    """One A/B arm: reconstruct ``stacks`` with ``module.name = value`` (restored after), one torch
    thread, stack masks; returns ``(row, prepared, result)`` where ``row`` holds ``psnr``, ``ssim``
    (``compare_volumes(..., align=True, scale=True)`` against ``gt``), ``time_s`` and ``verdict``."""
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.evaluation.metrics import compare_volumes
    from slice2vol.evaluation.quality import assess_quality
    from slice2vol.methods.run import crop_to_roi, run_reconstruction

    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        t0 = time.perf_counter()
        prep, res, _ = run_reconstruction(stacks, method=method, have_stack_masks=True, progress=False)
        wall = time.perf_counter() - t0
        verdict = assess_quality(prep, res).verdict
    finally:
        setattr(module, name, saved)
    m = compare_volumes(crop_to_roi(res.volume, prep.roi, GT_MARGIN_VOX), gt, align=True, scale=True)
    return {"psnr": float(m["psnr"]), "ssim": float(m["ssim"]), "time_s": wall, "verdict": verdict}, prep, res


def _load_atlas(data: Path, atlas: str):
    from slice2vol import io
    from slice2vol.evaluation.benchmark import atlas_dir

    adir = atlas_dir(data, atlas)
    return io.load_volume(adir / "t2.nii.gz", adir / "mask.nii.gz")


def _simulate(volume, motion: str, seed: int, orientations=("axial", "coronal", "sagittal"), signal_loss: float = 0.0,
              noise: float = 0.02, profile: str = "gaussian", spacing: float = 1.0, zero_fill: int = 1):
    from slice2vol.core.runtime import seed_everything
    from slice2vol.simulation.simulate import SimulationConfig, realism_for, simulate_stacks

    cfg = SimulationConfig(n_stacks=len(orientations), orientations=orientations, spacing=spacing, thickness=3.0,
                           motion=motion, noise=noise, signal_loss=signal_loss, profile=profile, zero_fill=zero_fill,
                           **realism_for(motion))
    return simulate_stacks(volume, None, cfg, seed_everything(seed), progress=False)


def simulated_cases(data: Path, atlases, seeds, motions, noises, profiles=("gaussian",), transform=None):
    """``(atlas, seed, profile, motion, noise, stacks, ground truth)`` of every combination, in that
    loop order: the A/B benchmarks' cases (3 orthogonal 1 mm x 3 mm stacks, :func:`_simulate`), the
    ground truth cropped as the metrics compare it; ``transform`` is applied to each stack."""
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.methods.run import crop_to_roi

    for atlas in atlases:
        vol = _load_atlas(data, atlas)
        gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
        for seed in seeds:
            for profile in profiles:
                for motion in motions:
                    for noise in noises:
                        stacks = _simulate(vol, motion, seed, noise=noise, profile=profile).stacks
                        if transform is not None:
                            stacks = [transform(st) for st in stacks]
                        yield atlas, seed, profile, motion, noise, stacks, gt


def simulated_exams(vol, seed: int) -> dict[str, list]:
    """The simulated stacks of one atlas and seed that need no other atlas: ``good`` (3 moderate
    stacks), the 4th stack of ``rescan`` (moderate axial) and of ``extreme`` (extreme axial), and
    ``all-<level>`` (3 stacks) for the levels of :data:`GOOD_LEVELS` but moderate.  Each draw has its
    own seed, so what is simulated does not depend on what else is."""
    out = {"good": list(_simulate(vol, "moderate", seed).stacks),
           "rescan": list(_simulate(vol, "moderate", seed + 6000, ("axial",)).stacks),
           "extreme": list(_simulate(vol, "extreme", seed + 1000, ("axial",)).stacks)}
    for level in GOOD_LEVELS:
        if level != "moderate":
            out[f"all-{level}"] = list(_simulate(vol, level, seed + 5000).stacks)
    return out


def _centre(volume) -> np.ndarray:
    idx = torch.nonzero(volume.mask).double().numpy()
    return idx.mean(0) @ volume.affine[:3, :3].T + volume.affine[:3, 3]


def _save(stacks, folder: Path, first: int = 0) -> list[str]:
    from slice2vol import io

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for s, st in enumerate(stacks, start=first):
        name = f"stack_{s:02d}.nii.gz"
        io.save_stack(st, folder / name)
        mask = np.moveaxis(st.mask.cpu().numpy(), 0, 2).astype(np.uint8)
        io.save_volume(mask, folder / f"mask_{s:02d}.nii.gz", st.affine, dtype=np.uint8)
        names.append(name)
    return names


def _shifted(st, shift: np.ndarray):
    """The stack moved rigidly by ``shift`` mm (header and poses)."""
    from dataclasses import replace

    A = st.affine.copy()
    A[:3, 3] += shift
    P = st.poses.copy()
    P[:, :3, 3] += shift
    return replace(st, affine=A, poses=P)


def near_atlas(atlas: str) -> str:
    """The atlas next to ``atlas`` in its split's list (0-2 weeks apart): the hard case."""
    from slice2vol.simulation.splits import SPLITS

    for names in SPLITS.values():
        if atlas in names:
            i = names.index(atlas)
            return names[i + 1] if i + 1 < len(names) else names[i - 1]
    raise SystemExit(f"bench_selection: {atlas} is in no split")


def _other_near(data: Path, atlas: str, seed: int, folder: Path, vol) -> None:
    near = near_atlas(atlas)
    nvol = _load_atlas(data, near)
    st = _simulate(nvol, "moderate", seed + 2000, ("axial",)).stacks[0]
    _save([_shifted(st, _centre(vol) - _centre(nvol))], folder / "other-near", first=3)


def make_case(data: Path, atlas: str, seed: int, folder: Path) -> dict:
    """Write ``folder/good`` (3 moderate stacks), ``folder/<kind>`` (the bad 4th stack of each
    kind), ``folder/rescan`` (a good moderate 4th stack), ``folder/<level>`` (3 stacks at each
    motion level) and the ground truth; ``case.json`` last.  Reused when present."""
    from dataclasses import replace

    from slice2vol import io
    from slice2vol.evaluation.benchmark.settings import GT_MARGIN_VOX
    from slice2vol.methods.run import crop_to_roi

    meta_path = folder / "case.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if not (folder / "other-near" / "stack_03.nii.gz").is_file():  # added later: a case may lack it
            _other_near(data, atlas, seed, folder, _load_atlas(data, atlas))
            meta["other_near_atlas"] = near_atlas(atlas)
            io.write_json(meta, meta_path)
        return meta
    vol = _load_atlas(data, atlas)
    sims = simulated_exams(vol, seed)
    _save(sims["good"], folder / "good")
    _save(sims["rescan"], folder / "rescan", first=3)
    _save(sims["extreme"], folder / "extreme", first=3)
    other = other_atlas(atlas)
    ovol = _load_atlas(data, other)
    ost = _simulate(ovol, "moderate", seed + 2000, ("axial",)).stacks[0]
    _save([_shifted(ost, _centre(vol) - _centre(ovol))], folder / "other", first=3)
    nst = _simulate(vol, "moderate", seed + 3000, ("axial",)).stacks[0]
    sd = float(nst.slices[nst.mask].mean())
    g = torch.Generator().manual_seed(seed + 4000)
    noise = (torch.randn(nst.slices.shape, generator=g) * sd).abs().to(nst.slices.dtype)
    _save([replace(nst, slices=noise)], folder / "noise", first=3)
    for level in GOOD_LEVELS:
        if level != "moderate":
            _save(sims[f"all-{level}"], folder / f"all-{level}")
    gt = crop_to_roi(vol, vol.mask, GT_MARGIN_VOX)
    io.save_volume(gt, folder / "gt.nii.gz")
    io.save_volume(gt.mask.numpy().astype(np.uint8), folder / "gt_mask.nii.gz", gt.affine, dtype=np.uint8)
    _other_near(data, atlas, seed, folder, vol)
    meta = {"atlas": atlas, "other_atlas": other, "other_near_atlas": near_atlas(atlas), "seed": seed}
    io.write_json(meta, meta_path)
    return meta


def stack_files(folder: Path, variant: str) -> tuple[list[str], list[str]]:
    """Stacks and masks of a variant: ``good``; a bad kind or ``rescan`` (good + the 4th);
    ``all-<level>`` (3 stacks at one motion level)."""
    base = folder / (variant if variant.startswith("all-") else "good")
    stacks = [str(base / f"stack_{s:02d}.nii.gz") for s in range(3)]
    if variant in BAD_KINDS + ("rescan", "other-near"):
        stacks.append(str(folder / variant / "stack_03.nii.gz"))
    return stacks, [s.replace("stack_", "mask_") for s in stacks]


def assess(folder: Path, variant: str):
    from slice2vol import io
    from slice2vol.methods.selection import assess_stacks

    stacks, masks = stack_files(folder, variant)
    return assess_stacks(io.load_stacks(stacks, None, masks))


def reconstruct(folder: Path, variant: str, out: Path, keep_all: bool) -> dict:
    """``slice2vol reconstruct`` in its own process (1 thread); returns PSNR, dropped, time."""
    from slice2vol import io
    from slice2vol.evaluation.metrics import compare_volumes

    out.mkdir(parents=True, exist_ok=True)
    stacks, masks = stack_files(folder, variant)
    argv = [sys.executable, "-m", "slice2vol.cli.parser", "reconstruct", *stacks, "--stack-masks", *masks,
            "-o", str(out / "recon.nii.gz"), "--output-transforms", str(out / "transforms.json"), "--no-progress",
            "--device", "cpu"] + (["--keep-all-stacks"] if keep_all else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    if not (out / "transforms.json").is_file():
        run = subprocess.run(argv, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"reconstruct failed ({run.returncode}): {' '.join(argv)}\n{run.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    rec = json.loads((out / "transforms.json").read_text())
    gt = io.load_volume(folder / "gt.nii.gz", folder / "gt_mask.nii.gz")
    m = compare_volumes(io.load_volume(out / "recon.nii.gz"), gt, align=True, scale=True)
    sel = rec.get("stack_selection") or {}
    names = [s["name"] for s in sel.get("stacks", [])]
    return {"psnr": float(m["psnr"]), "dropped": [names[i] for i in sel.get("dropped", [])],
            "reasons": [s["reason"] for s in sel.get("stacks", []) if not s["keep"]],
            "time_s": rec["timings_s"]["total_s"], "wall_s": wall, "selection_s": sel.get("time_s")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_atlas_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("bench_out/selection"))
    p.add_argument("--assess-only", action="store_true", help="only the assessment tables (no reconstruction)")
    p.add_argument("--tables", action="store_true", help="print every assessment table")
    args = p.parse_args(argv)
    data, atlases = setup(args)
    print(f"slice2vol stack selection benchmark: atlases {', '.join(atlases)}, seed {args.seed}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}", flush=True)
    rows, good_rows, near_rows = [], [], []
    for atlas in atlases:
        folder = args.output / f"{atlas}_seed{args.seed}"
        meta = make_case(data, atlas, args.seed, folder)
        for variant in (("good", "rescan") + tuple(f"all-{lv}" for lv in GOOD_LEVELS if lv != "moderate") + BAD_KINDS
                        + ("other-near",)):
            sel = assess(folder, variant)
            if args.tables or args.assess_only:
                print(f"\n== {atlas} {variant}" + (f" (other atlas {meta['other_atlas']})" if variant == "other" else "")
                      + f": assessed in {sel.time_s:.1f} s\n{sel.table()}", flush=True)
            if variant == "other-near":
                near_rows.append((atlas, meta.get("other_near_atlas", "?"), sel.dropped, sel.stacks[3].agreement,
                                  float(np.median([s.agreement for s in sel.stacks[:3]]))))
            elif variant not in BAD_KINDS:
                good_rows.append((atlas, variant, len(sel.stacks), len(sel.dropped), sel.time_s))
        if args.assess_only:
            continue
        base = reconstruct(folder, "good", folder / "run_good", keep_all=False)
        print(f"-- {atlas}: 3 good stacks {base['psnr']:.2f} dB, dropped {len(base['dropped'])} "
              f"({base['time_s']:.0f} s)", flush=True)
        for kind in BAD_KINDS:
            sel = reconstruct(folder, kind, folder / f"run_{kind}", keep_all=False)
            allk = reconstruct(folder, kind, folder / f"run_{kind}_all", keep_all=True)
            rows.append((atlas, kind, meta["other_atlas"] if kind == "other" else "", sel, allk, base))
            print(f"   + {kind:<8} selection {sel['psnr']:.2f} dB (dropped {', '.join(sel['dropped']) or 'none'}), "
                  f"all stacks {allk['psnr']:.2f} dB", flush=True)
    if good_rows:
        print("\ngood cases (assessment only; 3 stacks at one motion level, 'good' / 'rescan': moderate, "
              "rescan = + a 4th moderate axial stack)")
        print(f"{'atlas':<18} {'case':<9} {'stacks':>6} {'dropped':>7} {'assess s':>8}")
        for atlas, variant, n, d, t in good_rows:
            print(f"{atlas:<18} {variant:<9} {n:>6} {d:>7} {t:>8.1f}")
        print(f"total dropped on good cases: {sum(r[3] for r in good_rows)} of {sum(r[2] for r in good_rows)} stacks "
              f"({len(good_rows)} cases)")
    if near_rows:
        print("\nnot part of the target, assessment only: a 4th stack of the NEIGHBOURING atlas (0-2 weeks apart), "
              "moved into the same field of view")
        for atlas, near, dropped, a, med in near_rows:
            print(f"  {atlas:<18} + {near:<18} dropped {dropped or 'none'}; its agreement {a:.2f}, good stacks' median {med:.2f}")
    if rows:
        print("\nbad 4th stack: reconstruct (auto, 0.8 mm, 1 thread) with the default selection, with "
              "--keep-all-stacks, and the 3 good stacks alone; PSNR dB against the truth")
        print(f"{'atlas':<18} {'bad':<8} {'dropped':<16} {'PSNR sel':>8} {'PSNR w/o':>8} {'sel-w/o':>7} "
              f"{'PSNR all':>8} {'all-w/o':>7} {'time s':>6}")
        for atlas, kind, other, sel, allk, base in rows:
            print(f"{atlas:<18} {kind:<8} {', '.join(sel['dropped']) or 'none':<16} {sel['psnr']:>8.2f} "
                  f"{base['psnr']:>8.2f} {sel['psnr'] - base['psnr']:>+7.2f} {allk['psnr']:>8.2f} "
                  f"{allk['psnr'] - base['psnr']:>+7.2f} {sel['time_s']:>6.0f}")
        ok = [r for r in rows if r[3]["dropped"] == ["stack_03.nii.gz"]]
        within = [r for r in rows if abs(r[3]["psnr"] - r[5]["psnr"]) <= 0.3]
        print(f"bad stack dropped (and only it): {len(ok)} of {len(rows)}; within 0.3 dB of the run without it: "
              f"{len(within)} of {len(rows)}")
        for kind in BAD_KINDS:
            d = [r[4]["psnr"] - r[5]["psnr"] for r in rows if r[1] == kind]
            print(f"  keeping the {kind} stack instead would cost {np.mean(d):+.2f} dB on average "
                  f"[{min(d):+.2f}, {max(d):+.2f}]")
        print("dropped stacks' reasons:")
        for atlas, kind, _, sel, _, _ in rows:
            print(f"  {atlas} {kind}: {' | '.join(sel['reasons']) or '-'}")
        t = [r[3]["selection_s"] for r in rows if r[3]["selection_s"] is not None]
        if t:
            print(f"assessment time inside reconstruct (4 stacks, 1 thread): mean {np.mean(t):.1f} s, max {max(t):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
