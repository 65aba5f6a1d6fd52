"""``slice2vol benchmark``: reconstruction methods on simulated atlas cases with ground truth.

For every atlas x motion level x seed a *case* is simulated once (3 orthogonal stacks, 1 mm
in-plane, ``--thickness`` mm thick, Rician noise) from a CRL 2017 atlas with
:func:`slice2vol.simulate.simulate_stacks` into ``OUTPUT/cases/ATLAS_MOTION_seedS/`` and shared by
every method.  Each *job* -- a (case, method) pair, plus one ``naive`` job per case -- runs in its
own worker process (``python -m slice2vol.benchmark --worker CASE --method NAME``) so that its
peak RSS is its own; it reads the stacks as the CLI would and

* for a method (a name of :data:`slice2vol.commands.METHOD_VARIANTS`): reconstructs with
  :func:`slice2vol.commands.run_reconstruction` (``have_stack_masks=True``), timed by wall clock
  (preparation + method; not I/O, simulation or evaluation), peak RSS of the worker (``VmHWM``
  reset just before the reconstruction) and on CUDA ``torch.cuda.max_memory_allocated``;
* for ``naive``: the motion-blind PSF-weighted average of the intensity-normalised slices at their
  *header* poses on the same grid (as :func:`slice2vol.commands.naive_consistency` builds it); its
  time is that of the average alone (it needs no registration), its memory the peak RSS of
  preparation + average;

then evaluates the volume on the ROI grid against the atlas with
``metrics.compare_volumes(..., align=True, scale=True)`` inside the atlas brain mask (PSNR, SSIM,
NRMSE, NCC), the slice TRE (cSVR eq. 10, median over stacks of the per-slice maximum pixel error,
global rigid motion removed) of its poses against the simulator's true poses, and the slice
consistency.  The worker writes ``CASE/METHOD/result.json`` atomically; a rerun skips a job whose
result says ``ok`` (a failed job is tried again) and never re-simulates a case whose
``case.json`` exists.

The parent writes ``results.csv`` (one row per case x method), ``results.md`` (mean +- sd per
method x motion level), ``psnr_ssim_vs_motion.png`` and ``time_per_method.png`` into the output
folder, and optionally copies the table and pictures into a README between marker comments
(:func:`update_readme`).
"""
from __future__ import annotations

import argparse
import csv
import io as _stdio
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import Slice2VolError

log = logging.getLogger("slice2vol")

__all__ = ["BenchmarkConfig", "config_from_args", "run_benchmark", "benchmark_command", "load_records",
           "aggregate", "markdown_table", "write_results", "update_readme", "replace_between_markers",
           "NAIVE", "DEFAULT_ATLASES", "DEFAULT_MOTION", "DEFAULT_SEEDS"]

NAIVE = "naive"  # the motion-blind baseline's row name (evaluated once per case, method-independent)
DEFAULT_ATLASES = ("STA23", "STA29", "STA35")
DEFAULT_MOTION = ("mild", "moderate", "severe")
DEFAULT_SEEDS = (0, 1)
#: Atlas collections searched for a bare atlas name, in this order: CRL 2017 (``STA21``..``STA38``)
#: and the spina-bifida atlas (``GA27_operated``, ...), which cSVR's training never saw.
ATLAS_GROUPS = ("crl2017", "spina_bifida2021")


def atlas_dir(data: Path, atlas: str) -> Path | None:
    """Folder of ``atlas`` (with ``t2.nii.gz`` and ``mask.nii.gz``) under ``data/fetal_atlases``, or None."""
    for group in ATLAS_GROUPS:
        d = Path(data) / "fetal_atlases" / group / atlas
        if (d / "t2.nii.gz").is_file() and (d / "mask.nii.gz").is_file():
            return d
    return None
GT_MARGIN_VOX = 5  # ground truth cropped to the brain + 5 voxels (registration for align=True is then faster)
RESULT_JSON = "result.json"
CASE_JSON = "case.json"
SETTINGS_JSON = "benchmark.json"
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
PLOT_QUALITY, PLOT_TIME = "psnr_ssim_vs_motion.png", "time_per_method.png"

#: Table columns: (header, record key, number format).  Mean +- sd over the cases of a method x motion cell.
TABLE_METRICS = [
    ("PSNR dB", "psnr", ".2f"),
    ("SSIM", "ssim", ".3f"),
    ("NRMSE", "nrmse", ".3f"),
    ("TRE mm", "tre_median_mm", ".2f"),
    ("time s", "time_s", ".1f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
]
GPU_METRIC = ("peak CUDA MB", "gpu_peak_mb", ".0f")  # added to the table when any job ran on CUDA

# Settings that change what a case or a result is: a rerun into the same folder must use the same.
_RESULT_SETTINGS = ("resolution", "thickness", "noise", "iterations")


# ------------------------------------------------------------------------------------ settings


def default_data_dir() -> Path:
    """``$SLICE2VOL_SHARED``, else ``../shared/data`` relative to the working directory (the
    checkout's neighbour when run from the repository root, as the tests and benchmarks expect)."""
    env = os.environ.get("SLICE2VOL_SHARED")
    return Path(env) if env else Path("..") / "shared" / "data"


def default_methods() -> list[str]:
    """Every plain method name (no ``-``) of :data:`slice2vol.commands.METHOD_VARIANTS`."""
    from .commands import METHOD_VARIANTS

    return [name for name in METHOD_VARIANTS if "-" not in name]


@dataclass
class BenchmarkConfig:
    """What to run and where.  ``resolution``, ``thickness`` in mm; ``noise`` relative to the
    mean brain intensity; ``threads`` torch CPU threads per process (None: torch's default)."""

    output: Path
    atlases: list[str] = field(default_factory=lambda: list(DEFAULT_ATLASES))
    motion: list[str] = field(default_factory=lambda: list(DEFAULT_MOTION))
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    methods: list[str] = field(default_factory=default_methods)
    data: Path = field(default_factory=default_data_dir)
    device: str = "auto"
    resolution: float = 0.8
    thickness: float = 3.0
    noise: float = 0.02
    iterations: int | None = None
    threads: int | None = None
    progress: bool = True
    update_readme: Path | None = None
    report_picture: Path | None = None

    def command_line(self) -> str:
        """The equivalent ``slice2vol benchmark`` command with every result-relevant option spelt out."""
        parts = ["slice2vol", "benchmark", "--atlases", ",".join(self.atlases), "--motion", ",".join(self.motion),
                 "--seeds", ",".join(map(str, self.seeds)), "--methods", ",".join(self.methods),
                 "--device", self.device, "--resolution", f"{self.resolution:g}"]
        if self.thickness != 3.0:
            parts += ["--thickness", f"{self.thickness:g}"]
        if self.noise != 0.02:
            parts += ["--noise", f"{self.noise:g}"]
        if self.iterations is not None:
            parts += ["--iterations", str(self.iterations)]
        if self.threads is not None:
            parts += ["--threads", str(self.threads)]
        parts += ["--output", str(self.output)]
        return shlex.join(parts)


def split_list(values: Sequence[str] | str | None, what: str) -> list[str]:
    """``["a,b", "c"]`` or ``"a,b,c"`` -> ``["a", "b", "c"]`` (duplicates dropped, order kept)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        for item in str(v).split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    if not out:
        raise Slice2VolError(f"--{what}: empty list")
    return out


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """Build and check a :class:`BenchmarkConfig` from the ``benchmark`` subcommand's options.

    Every problem (unknown atlas, motion level or method, missing data folder, bad seed, output
    that is a file) raises :class:`Slice2VolError` before anything is written.
    """
    from .commands import method_variant
    from .motion import motion_level
    from .splits import expand_atlases

    data = Path(args.data) if args.data else default_data_dir()
    # a split name (train, validation, test; slice2vol.splits) stands for its atlases
    atlases = expand_atlases(split_list(args.atlases, "atlases")) if args.atlases else list(DEFAULT_ATLASES)
    motion = split_list(args.motion, "motion") if args.motion else list(DEFAULT_MOTION)
    seed_text = split_list(args.seeds, "seeds") if args.seeds else [str(s) for s in DEFAULT_SEEDS]
    methods = split_list(args.methods, "methods") if args.methods else default_methods()
    try:
        seeds = [int(s) for s in seed_text]
    except ValueError:
        raise Slice2VolError(f"--seeds: expected integers, got {','.join(seed_text)!r}") from None
    for m in motion:
        motion_level(m)  # raises for an unknown level
    for name in methods:
        if name == NAIVE:
            raise Slice2VolError(f"{NAIVE!r} is always evaluated (once per case); do not list it in --methods")
        method_variant(name)  # raises Slice2VolError for an unknown name
    if not data.is_dir():
        raise Slice2VolError(f"data folder {data} not found (give --data DIR or set SLICE2VOL_SHARED)")
    for a in atlases:
        if "/" in a or a in (".", "..") or atlas_dir(data, a) is None:
            roots = [data / "fetal_atlases" / g for g in ATLAS_GROUPS]
            known = sorted(p.name for r in roots if r.is_dir() for p in r.iterdir() if p.is_dir())
            raise Slice2VolError(f"unknown atlas {a!r}: no t2.nii.gz and mask.nii.gz for it in "
                                 + " or ".join(map(str, roots)) + (f" (available: {', '.join(known)})" if known else ""))
    for name, value in (("resolution", args.resolution), ("thickness", args.thickness)):
        if not value > 0:
            raise Slice2VolError(f"--{name} must be positive, got {value}")
    if args.noise < 0:
        raise Slice2VolError(f"--noise must not be negative, got {args.noise}")
    if args.iterations is not None and args.iterations < 1:
        raise Slice2VolError(f"--iterations must be at least 1, got {args.iterations}")
    if args.threads is not None and args.threads < 1:
        raise Slice2VolError(f"--threads must be at least 1, got {args.threads}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise Slice2VolError(f"output {output} exists and is not a folder")
    readme = Path(args.update_readme) if args.update_readme else None
    if readme is not None:
        if not readme.is_file():
            raise Slice2VolError(f"--update-readme {readme}: file not found")
        # Checked now, not after an hour of benchmarking.
        text = readme.read_text(encoding="utf-8")
        names = ["benchmark"] + (["report-picture"] if args.report_picture else [])
        for name in names:
            replace_between_markers(text, name, "")
    picture = Path(args.report_picture) if args.report_picture else None
    if picture is not None:
        if readme is None:
            raise Slice2VolError("--report-picture needs --update-readme")
        if not picture.is_file() or picture.suffix.lower() != ".png":
            raise Slice2VolError(f"--report-picture {picture}: expected an existing PNG file")
    return BenchmarkConfig(output=output, atlases=atlases, motion=motion, seeds=seeds, methods=methods, data=data,
                           device=args.device, resolution=float(args.resolution), thickness=float(args.thickness),
                           noise=float(args.noise), iterations=args.iterations, threads=args.threads,
                           progress=not args.no_progress, update_readme=readme, report_picture=picture)


def _check_settings(cfg: BenchmarkConfig) -> None:
    """Refuse to mix results made with other settings (grid size, slice thickness, noise,
    iterations) into ``cfg.output``: resumed jobs would otherwise be silently inconsistent."""
    path = cfg.output / SETTINGS_JSON
    if not path.is_file():
        return
    try:
        theirs = json.loads(path.read_text()).get("settings", {})
    except (OSError, ValueError):
        theirs = {}
    mine = {k: getattr(cfg, k) for k in _RESULT_SETTINGS}
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if k in theirs and theirs[k] != v}
    if diff:
        raise Slice2VolError(f"output {cfg.output} holds results made with other settings ("
                             + ", ".join(f"{k} {a} there, {b} asked" for k, (a, b) in diff.items())
                             + "); choose another --output")


def _record_settings(cfg: BenchmarkConfig) -> None:
    """Write ``benchmark.json`` (the result-relevant settings) on the first run into a folder."""
    from . import io

    path = cfg.output / SETTINGS_JSON
    if not path.is_file():
        io.write_json({"settings": {k: getattr(cfg, k) for k in _RESULT_SETTINGS},
                       "created": datetime.now().isoformat(timespec="seconds")}, path)


# ------------------------------------------------------------------------------------ cases


def case_name(atlas: str, motion: str, seed: int) -> str:
    """Folder name of a case under ``OUTPUT/cases``."""
    return f"{atlas}_{motion}_seed{seed}"


def simulate_case(cfg: BenchmarkConfig, atlas: str, motion: str, seed: int, case_dir: Path) -> dict:
    """Simulate one case into ``case_dir``: stacks, masks, true poses, ground truth cropped to the
    brain; ``case.json`` is written last, so its presence means the case is complete."""
    import torch

    from . import io
    from .commands import crop_to_roi
    from .runtime import seed_everything
    from .simulate import SimulationConfig, realism_for, save_simulation, simulate_stacks

    adir = atlas_dir(cfg.data, atlas)
    volume = io.load_volume(adir / "t2.nii.gz", adir / "mask.nii.gz")
    config = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=1.0,
                              thickness=cfg.thickness, motion=motion, noise=cfg.noise,
                              **realism_for(motion))  # extreme: random interleave, tilted stacks
    t0 = time.perf_counter()
    sim = simulate_stacks(volume, None, config, seed_everything(seed), progress=False)
    sim_s = time.perf_counter() - t0
    save_simulation(sim, case_dir)
    gt = crop_to_roi(volume, volume.mask, GT_MARGIN_VOX)
    io.save_volume(gt, case_dir / "gt.nii.gz")
    io.save_volume(gt.mask.numpy().astype(np.uint8), case_dir / "gt_mask.nii.gz", gt.affine, dtype=np.uint8)
    meta = {"atlas": atlas, "motion": motion, "seed": seed, "stacks": [st.name for st in sim.stacks],
            "stack_masks": [f"mask_{s:02d}.nii.gz" for s in range(len(sim.stacks))],
            "thickness": [cfg.thickness] * len(sim.stacks), "ground_truth": "gt.nii.gz",
            "ground_truth_mask": "gt_mask.nii.gz", "simulation_s": sim_s, "config": config.to_dict(),
            "stack_shapes": [list(st.slices.shape) for st in sim.stacks], "torch_threads": torch.get_num_threads()}
    io.write_json(meta, case_dir / CASE_JSON)
    return meta


# ------------------------------------------------------------------------------------ worker


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_job(case_dir: Path, method_name: str, device: str = "cpu", resolution: float = 0.8,
            iterations: int | None = None, threads: int | None = None) -> dict:
    """Reconstruct (or build the naive baseline of) one case and evaluate it; returns a JSON-ready dict.

    Meant to run in a fresh process (:func:`worker_main`) so the peak RSS is this job's alone.
    Times in s, memory in MB, TRE in mm.
    """
    import torch

    from . import acquisition as acq
    from . import io
    from .commands import crop_to_roi, method_variant, naive_consistency, run_reconstruction
    from .image import SliceSet, Volume
    from .memory import peak_rss_mb, reset_peak_rss, status_mb
    from .metrics import compare_volumes, match_poses, slice_consistency, slice_tre, tre_summary
    from .preprocess import prepare
    from .reconstruction import psf_average
    from .runtime import resolve_device, seed_everything

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    seed_everything(0)
    meta = json.loads((case_dir / CASE_JSON).read_text())
    stacks = io.load_stacks([case_dir / f for f in meta["stacks"]], meta["thickness"],
                            [case_dir / f for f in meta["stack_masks"]])

    rss_before = status_mb("VmRSS") or 0.0  # after imports and reading the stacks
    hwm_reset = reset_peak_rss()  # if False, the peak below is the whole process's
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"method": method_name}
    t0 = time.perf_counter()
    if method_name == NAIVE:
        prep = prepare(stacks, resolution, have_stack_masks=True, device=dev)
        _sync(dev)
        t1 = time.perf_counter()
        header = SliceSet.from_stacks(prep.stacks, device=prep.slices.device)
        res = float(np.linalg.norm(prep.affine[:3, :3], axis=0).mean())
        psf = acq.psf_kernel(header.spacing, header.thickness, res)
        data = psf_average(header.values, torch.ones_like(header.values), prep.shape, prep.affine, header.poses,
                           header.coords, header.slice_id, psf)
        _sync(dev)
        t2 = time.perf_counter()
        poses, result = header.poses, None
        out.update(variant={"method": NAIVE, "options": {}}, time_s=t2 - t1, prepare_s=t1 - t0, method_s=t2 - t1)
    else:
        method, options = method_variant(method_name)
        prep, result, timings = run_reconstruction(stacks, resolution=resolution, method=method, options=options,
                                                   have_stack_masks=True, iterations=iterations, device=dev,
                                                   progress=False)
        _sync(dev)
        data, poses = result.volume.data, result.poses
        out.update(variant={"method": method, "options": options}, time_s=time.perf_counter() - t0,
                   prepare_s=timings["prepare_s"], method_s=timings["method_s"])
    out.update(peak_rss_mb=peak_rss_mb(), rss_before_mb=rss_before, peak_rss_reset=hwm_reset,
               gpu_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None)

    # ---- image metrics on the ROI grid, as the CLI writes the volume (on the CPU)
    v = crop_to_roi(Volume(data * prep.roi, prep.affine, prep.roi), prep.roi)
    volume = Volume(v.data.detach().float().cpu(), v.affine)
    gt = io.load_volume(case_dir / meta["ground_truth"], case_dir / meta["ground_truth_mask"])
    m = compare_volumes(volume, gt, align=True, scale=True)
    out.update({k: float(m[k]) for k in ("psnr", "ssim", "nrmse", "ncc")})

    # ---- slice TRE against the simulator's true poses (stacks in order, slices by index)
    gt_poses = io.load_poses_json(case_dir / "gt_poses.json")
    ss = prep.slices  # slices in (stack, ascending index) order, as match_poses pairs them

    def tre(p) -> dict:
        P = p.detach().double().cpu().numpy()
        est = [{"index": st.index, "poses": P[ss.stack_slices[s]:ss.stack_slices[s + 1]]}
               for s, st in enumerate(prep.stacks)]
        match = match_poses(est, gt_poses)
        return tre_summary(slice_tre(match.est, match.gt, ss.coords.double().cpu(), ss.slice_id.cpu(), align=True),
                           match.stack_id)

    t = tre(poses)
    out.update(tre_median_mm=t["median"], tre_mean_mm=t["mean"], tre_p90_mm=t["p90"])
    out["tre_stackreg_median_mm"] = tre(ss.poses)["median"]  # the same for every method: where SVR starts

    # ---- slice consistency (acquired vs simulated slices)
    if result is None:
        c = naive_consistency(prep)
        out["excluded_slices"] = 0
    else:
        c = slice_consistency(ss, result.simulated.detach())
        has_pixels = torch.zeros(ss.n_slices, dtype=torch.bool, device=ss.device)
        has_pixels[ss.slice_id] = True
        out["excluded_slices"] = int(((result.slice_weights < 0.5) & has_pixels).sum())  # as the CLI counts them
        if result.history and "start" in result.history[0]:
            out["start"] = result.history[0]["start"]  # csvr --refine: which pose set SVR started from
        from .quality import assess_quality

        q = assess_quality(prep, result)  # the reference-free verdict the CLI prints, for confusion tables
        out.update(quality_verdict=q.verdict, quality_score=float(q.score), quality_reasons=list(q.reasons))
    out.update(consistency_ssim=float(c["ssim"]), consistency_psnr=float(c["psnr"]), consistency_ncc=float(c["ncc"]))
    out.update(device=str(dev), threads=torch.get_num_threads(), grid="x".join(map(str, prep.shape)),
               slices=int(ss.n_slices), pixels=int(ss.n_pixels), template=int(prep.template))
    return out


def _jsonable(obj):
    """NaN/Inf -> None and numpy scalars -> Python, so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a worker process: run one job and write ``CASE/METHOD/result.json``."""
    from . import io

    ap = argparse.ArgumentParser(prog="python -m slice2vol.benchmark", description="one benchmark job (internal)")
    ap.add_argument("--worker", type=Path, required=True, metavar="CASE_DIR")
    ap.add_argument("--method", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=float, default=0.8)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    res = run_job(args.worker, args.method, args.device, args.resolution, args.iterations, args.threads)
    res["status"] = "ok"
    io.write_json(_jsonable(res), args.worker / args.method / RESULT_JSON)
    return 0


# ------------------------------------------------------------------------------------ parent


@dataclass
class Job:
    """One (case, method) pair; ``method`` is a variant name or :data:`NAIVE`."""

    atlas: str
    motion: str
    seed: int
    method: str

    @property
    def case(self) -> str:
        return case_name(self.atlas, self.motion, self.seed)


def jobs_of(cfg: BenchmarkConfig) -> list[Job]:
    """Every job, case by case (naive first, then the methods in ``--methods`` order)."""
    return [Job(a, m, s, meth) for a in cfg.atlases for m in cfg.motion for s in cfg.seeds
            for meth in [NAIVE, *cfg.methods]]


def result_path(output: Path, job: Job) -> Path:
    return output / "cases" / job.case / job.method / RESULT_JSON


def read_result(path: Path) -> dict | None:
    """A job's stored result, or None when missing or unreadable (then it is run again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(output: Path, job: Job) -> bool:
    """Whether a job finished successfully before (a failed one is tried again)."""
    r = read_result(result_path(output, job))
    return r is not None and r.get("status") == "ok"


def run_worker(cfg: BenchmarkConfig, job: Job, device: str) -> dict:
    """Run one job in a fresh Python process; a failure becomes a ``status: failed`` result."""
    from . import io

    case_dir = cfg.output / "cases" / job.case
    job_dir = case_dir / job.method
    job_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "slice2vol.benchmark", "--worker", str(case_dir), "--method", job.method,
           "--device", device, "--resolution", repr(cfg.resolution)]
    if cfg.iterations is not None:
        cmd += ["--iterations", str(cfg.iterations)]
    env = dict(os.environ)
    # The worker must import this very package, wherever it is run from and however it is installed.
    pkg_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
    if cfg.threads:
        cmd += ["--threads", str(cfg.threads)]
        # OpenMP/MKL pools outside torch's control (numpy, scipy, SimpleITK) get the same limit.
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    (job_dir / "worker.log").write_text(proc.stdout + proc.stderr)
    res = read_result(result_path(cfg.output, job)) if proc.returncode == 0 else None
    if res is None or res.get("status") != "ok":
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        res = {"method": job.method, "status": "failed", "device": device,
               "error": lines[-1] if lines else f"worker exit status {proc.returncode}", "returncode": proc.returncode}
    res.update(atlas=job.atlas, motion=job.motion, seed=job.seed, case=job.case, worker_wall_s=wall)
    io.write_json(_jsonable(res), result_path(cfg.output, job))
    return res


def _flat(record: dict) -> dict:
    """One CSV row: identification first, then the numbers."""
    first = ["case", "atlas", "motion", "seed", "method", "status", "device", "threads"]
    row = {k: record.get(k) for k in first}
    for k, v in record.items():
        if k in first or k in ("variant",):
            continue
        row[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
    if isinstance(record.get("variant"), dict):
        row["variant_options"] = json.dumps(record["variant"].get("options", {}), sort_keys=True)
    return row


def load_records(output: Path, jobs: Iterable[Job]) -> list[dict]:
    """The stored results of ``jobs`` (missing ones left out), in job order."""
    out = []
    for job in jobs:
        r = read_result(result_path(output, job))
        if r is not None:
            r.update(atlas=job.atlas, motion=job.motion, seed=job.seed, case=job.case, method=job.method)
            out.append(r)
    return out


# ------------------------------------------------------------------------------------ tables


def _ordered(values: Iterable) -> list:
    out: list = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def aggregate(records: Sequence[dict]) -> list[dict]:
    """Mean and sd (ddof=1; None for a single case) of :data:`TABLE_METRICS` per method x motion.

    Rows keep the order in which methods and motion levels first appear (``naive`` first when
    present); failed records count in ``failed`` but not in the statistics.
    """
    methods = _ordered(r["method"] for r in records)
    if NAIVE in methods:
        methods = [NAIVE] + [m for m in methods if m != NAIVE]
    motions = _ordered(r["motion"] for r in records)
    keys = [k for _, k, _ in TABLE_METRICS] + [GPU_METRIC[1]]
    rows = []
    for method in methods:
        for motion in motions:
            cell = [r for r in records if r["method"] == method and r["motion"] == motion]
            if not cell:
                continue
            ok = [r for r in cell if r.get("status") == "ok"]
            row = {"method": method, "motion": motion, "n": len(ok), "failed": len(cell) - len(ok),
                   "device": ", ".join(_ordered(str(r.get("device")) for r in ok)) or "-"}
            for k in keys:
                v = np.array([r[k] for r in ok if isinstance(r.get(k), (int, float))], dtype=float)
                v = v[np.isfinite(v)]
                row[k] = {"mean": float(v.mean()) if v.size else None,
                          "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}
            rows.append(row)
    return rows


def _fmt_stat(s: dict, spec: str) -> str:
    if s["mean"] is None:
        return "n/a"
    return format(s["mean"], spec) if s["sd"] is None else f"{format(s['mean'], spec)} ± {format(s['sd'], spec)}"


def machine_description() -> str:
    """CPU model (from /proc/cpuinfo) and logical core count, e.g. ``Intel Xeon ... (2 cores)``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def markdown_table(rows: Sequence[dict]) -> str:
    """The aggregated rows as a Markdown table (mean ± sd)."""
    metrics = list(TABLE_METRICS)
    if any(r[GPU_METRIC[1]]["mean"] is not None for r in rows):
        metrics.append(GPU_METRIC)
    heads = ["method", "motion", "n"] + [h for h, _, _ in metrics] + ["device"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        n = str(r["n"]) + (f" ({r['failed']} failed)" if r["failed"] else "")
        cells = [r["method"], r["motion"], n] + [_fmt_stat(r[k], f) for _, k, f in metrics] + [r["device"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(records: Sequence[dict], cfg: BenchmarkConfig, date: str | None = None) -> str:
    """``results.md``: a header line (machine, device, torch, date, command) and the table."""
    import torch

    devices = ", ".join(_ordered(str(r.get("device")) for r in records if r.get("status") == "ok")) or cfg.device
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    date = date or datetime.now().strftime("%Y-%m-%d")
    n_cases = len(_ordered(r["case"] for r in records))
    threads = ", ".join(_ordered(str(r.get("threads")) for r in records if r.get("status") == "ok")) or "-"
    header = (f"Machine: {machine_description()}{gpu}; device {devices}, {threads} torch thread(s) per job; "
              f"torch {torch.__version__}; {date}.  \n"
              f"Command: `{cfg.command_line()}`")
    notes = (f"{n_cases} case(s): {len(cfg.atlases)} atlas(es) x {len(cfg.motion)} motion level(s) x "
             f"{len(cfg.seeds)} seed(s); mean ± sd over cases.  PSNR/SSIM/NRMSE on the atlas brain mask after "
             "rigid alignment and a linear intensity fit; TRE: median over stacks of the per-slice maximum pixel "
             "error (mm, global rigid motion removed; naive: header poses); time: preparation + method "
             "(naive: the PSF average alone); peak RSS of the job's own process.")
    return f"{header}\n\n{markdown_table(aggregate(records))}\n\n{notes}\n"


def write_csv(records: Sequence[dict], path: Path) -> None:
    """``results.csv``: one row per record, the union of all fields as columns."""
    from . import io

    rows = [_flat(r) for r in records]
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="")
    w.writeheader()
    w.writerows(rows)
    io.atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def _figure_save(fig, path: Path) -> None:
    from . import io

    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor="white"))


def plot_quality(rows: Sequence[dict], path: Path) -> None:
    """Two panels, PSNR and SSIM against motion level, one line per method with sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    motions = _ordered(r["motion"] for r in rows)
    methods = _ordered(r["method"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110, constrained_layout=True)
    for ax, (key, label) in zip(axes, [("psnr", "PSNR (dB)"), ("ssim", "SSIM")]):
        for i, method in enumerate(methods):
            cells = {r["motion"]: r[key] for r in rows if r["method"] == method}
            x = [j for j, m in enumerate(motions) if m in cells and cells[m]["mean"] is not None]
            y = [cells[motions[j]]["mean"] for j in x]
            e = [cells[motions[j]]["sd"] or 0.0 for j in x]
            # a small horizontal offset per method keeps overlapping error bars readable
            xs = [j + (i - (len(methods) - 1) / 2) * 0.06 for j in x]
            ax.errorbar(xs, y, yerr=e, marker="o", capsize=3, label=method,
                        linestyle="--" if method == NAIVE else "-")
        ax.set_xticks(range(len(motions)), motions)
        ax.set_xlim(-0.5, len(motions) - 0.5)  # one motion level would otherwise spread the offsets edge to edge
        ax.set_xlabel("simulated motion")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Reconstruction quality vs motion (mean ± sd over cases)", fontsize=10)
    _figure_save(fig, path)
    plt.close(fig)


def plot_time(rows: Sequence[dict], path: Path) -> None:
    """Wall time per method (bars per motion level, sd error bars, log scale: naive is ~100x faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    motions = _ordered(r["motion"] for r in rows)
    methods = _ordered(r["method"] for r in rows)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(methods) + 2), 3.6), dpi=110, constrained_layout=True)
    width = 0.8 / max(len(motions), 1)
    for j, motion in enumerate(motions):
        cells = {r["method"]: r["time_s"] for r in rows if r["motion"] == motion}
        x = [i for i, m in enumerate(methods) if m in cells and cells[m]["mean"] is not None]
        y = [cells[methods[i]]["mean"] for i in x]
        e = [cells[methods[i]]["sd"] or 0.0 for i in x]
        ax.bar([i + (j - (len(motions) - 1) / 2) * width for i in x], y, width, yerr=e, capsize=3, label=motion)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_yscale("log")
    ax.set_ylabel("wall time per case (s)")
    ax.set_title("Time per method (mean ± sd over cases)", fontsize=10)
    ax.legend(title="motion", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _figure_save(fig, path)
    plt.close(fig)


def write_results(records: Sequence[dict], cfg: BenchmarkConfig) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and the two plots into ``cfg.output``."""
    from . import io

    out = cfg.output
    write_csv(records, out / RESULTS_CSV)
    io.atomic_write(out / RESULTS_MD, lambda tmp: Path(tmp).write_text(results_markdown(records, cfg)))
    rows = aggregate(records)
    written = [out / RESULTS_CSV, out / RESULTS_MD]
    if any(r["n"] for r in rows):
        plot_quality(rows, out / PLOT_QUALITY)
        plot_time(rows, out / PLOT_TIME)
        written += [out / PLOT_QUALITY, out / PLOT_TIME]
    return written


# ------------------------------------------------------------------------------------ README


def replace_between_markers(text: str, name: str, content: str) -> str:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` by ``content``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise Slice2VolError(f"the README needs exactly one {start} ... {end} pair")
    return pattern.sub(lambda _: f"{start}\n{content.strip()}\n{end}", text)


def update_readme(readme: Path, results_dir: Path, report_picture: Path | None = None,
                  assets: str = "benchmarks/results") -> list[Path]:
    """Copy ``results_dir``'s table and plots into ``readme`` (between ``benchmark`` markers) and
    optionally one report picture (between ``report-picture`` markers).

    Pictures are copied to ``ASSETS/`` beside the README (so the README never links into a
    scratch folder) as ``benchmark_*.png`` and ``report_picture.png``; the CSV as
    ``benchmark_results.csv``.  Returns the files written.
    """
    from . import io

    readme = Path(readme)
    results_dir = Path(results_dir)
    md = results_dir / RESULTS_MD
    if not md.is_file():
        raise Slice2VolError(f"{md} not found: run slice2vol benchmark --output {results_dir} first")
    text = readme.read_text(encoding="utf-8")
    folder = readme.parent / assets
    written = []

    def copy(src: Path, name: str) -> str:
        dst = folder / name
        io.atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
        written.append(dst)
        return f"{assets}/{name}"

    parts = [md.read_text(encoding="utf-8").strip()]
    pics = [(PLOT_QUALITY, "PSNR and SSIM vs motion"), (PLOT_TIME, "time per method")]
    links = [f"![{alt}]({copy(results_dir / f, 'benchmark_' + f)})" for f, alt in pics if (results_dir / f).is_file()]
    if links:
        parts.append("\n".join(links))
    if (results_dir / RESULTS_CSV).is_file():
        parts.append(f"Per-case figures: [`{copy(results_dir / RESULTS_CSV, 'benchmark_results.csv')}`]"
                     f"({assets}/benchmark_results.csv).")
    text = replace_between_markers(text, "benchmark", "\n\n".join(parts))
    if report_picture is not None:
        rel = copy(Path(report_picture), "report_picture.png")
        text = replace_between_markers(text, "report-picture", f"![report: {Path(report_picture).name}]({rel})")
    io.atomic_write(readme, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return written + [readme]


# ------------------------------------------------------------------------------------ command


def run_benchmark(cfg: BenchmarkConfig) -> int:
    """Run every job not finished before, then write the results; returns the exit status
    (0, or 1 when a job failed)."""
    import torch
    from tqdm import tqdm

    from . import io
    from .runtime import resolve_device

    device = str(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # the simulation runs in this process
    _check_settings(cfg)  # before anything is written
    try:
        (cfg.output / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Slice2VolError(f"cannot create the output folder {cfg.output}: {exc.strerror or exc}") from None
    _record_settings(cfg)
    jobs = jobs_of(cfg)
    todo = [j for j in jobs if not is_done(cfg.output, j)]
    n_cases = len(jobs) // (len(cfg.methods) + 1)
    msg = (f"slice2vol benchmark: {n_cases} case(s) x {len(cfg.methods)} method(s) + naive = {len(jobs)} job(s), "
           f"{len(jobs) - len(todo)} already done; device {device}, torch {torch.__version__}, "
           f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(msg, flush=True)
    failed: list[dict] = []
    sim_errors: dict[str, str] = {}  # case -> why its simulation failed (tried once per run)
    t_start = time.perf_counter()
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="benchmark", unit="job",
              disable=not cfg.progress, dynamic_ncols=True) as bar:
        for job in todo:
            case_dir = cfg.output / "cases" / job.case
            if job.case not in sim_errors and not (case_dir / CASE_JSON).is_file():
                bar.set_postfix_str(f"{job.case}: simulating")
                try:
                    simulate_case(cfg, job.atlas, job.motion, job.seed, case_dir)
                except Exception as exc:  # one bad case must not stop the others
                    log.debug("simulation failed", exc_info=True)
                    sim_errors[job.case] = f"simulation: {type(exc).__name__}: {exc}"
            if job.case in sim_errors:
                err = {"status": "failed", "error": sim_errors[job.case], "atlas": job.atlas, "motion": job.motion,
                       "seed": job.seed, "case": job.case, "method": job.method}
                io.write_json(err, result_path(cfg.output, job))
                failed.append(err)
                bar.write(f"FAILED {job.case} {job.method}: {err['error']}")
                bar.update(1)
                continue
            bar.set_postfix_str(f"{job.case} {job.method}")
            res = run_worker(cfg, job, device)
            if res.get("status") != "ok":
                failed.append(res)
                bar.write(f"FAILED {job.case} {job.method}: {res.get('error')}")
            elif cfg.progress or log.isEnabledFor(logging.INFO):
                bar.write(f"{job.case:<24} {job.method:<16} PSNR {res['psnr']:6.2f} dB  SSIM {res['ssim']:.3f}  "
                          f"TRE {res['tre_median_mm']:6.2f} mm  {res['time_s']:7.1f} s  {res['peak_rss_mb']:6.0f} MB")
            bar.update(1)
    records = load_records(cfg.output, jobs)
    written = write_results(records, cfg)
    if cfg.update_readme is not None:
        written += update_readme(cfg.update_readme, cfg.output, cfg.report_picture)
    elapsed = time.perf_counter() - t_start
    print(f"ran {len(todo)} job(s) in {elapsed:.1f} s; wrote " + ", ".join(str(p) for p in written), flush=True)
    if failed:
        print(f"{len(failed)} job(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.get('case')} {r.get('method')}: {r.get('error')}", file=sys.stderr)
        return 1
    return 0


def benchmark_command(args: argparse.Namespace) -> int:
    """The ``benchmark`` subcommand."""
    return run_benchmark(config_from_args(args))


if __name__ == "__main__":
    sys.exit(worker_main())
