"""Benchmark settings: constants, defaults, :class:`BenchmarkConfig` and its record."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

from slice2vol.errors import Slice2VolError
from slice2vol.io import shared_data_dir

log = logging.getLogger("slice2vol")


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



def default_methods() -> list[str]:
    """Every plain method name (no ``-``) of :data:`slice2vol.methods.run.METHOD_VARIANTS`."""
    from slice2vol.methods.run import METHOD_VARIANTS

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
    data: Path = field(default_factory=shared_data_dir)
    device: str = "auto"
    resolution: float = 0.8
    thickness: float = 3.0
    noise: float = 0.02
    iterations: int | None = None
    threads: int | None = None
    #: the engine (slice2vol.core.engine): a running dask scheduler's address, else a LocalCluster of
    #: ``workers`` processes (default: cores / threads); ``processes=False`` makes its workers threads
    #: of this process (tests).  Each job still runs in a fresh Python process of its own.
    scheduler: str | None = None
    workers: int | None = None
    processes: bool = True
    verbose: bool = False
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
    from slice2vol.methods.run import method_variant
    from slice2vol.simulation.motion import motion_level
    from slice2vol.simulation.splits import expand_atlases

    data = (Path(args.data) if args.data else shared_data_dir()).absolute()
    # a split name (train, validation, test; slice2vol.simulation.splits) stands for its atlases
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
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 1:
        raise Slice2VolError(f"--workers must be at least 1, got {workers}")
    # absolute: the jobs may run on other machines (--scheduler) from another working directory
    output = Path(args.output).absolute()
    if output.exists() and not output.is_dir():
        raise Slice2VolError(f"output {output} exists and is not a folder")
    readme = Path(args.update_readme) if args.update_readme else None
    if readme is not None:
        if not readme.is_file():
            raise Slice2VolError(f"--update-readme {readme}: file not found")
        # Checked now, not after an hour of benchmarking.
        from slice2vol.evaluation.benchmark.readme import replace_between_markers  # (readme imports settings)

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
                           scheduler=getattr(args, "scheduler", None), workers=workers,
                           verbose=bool(getattr(args, "verbose", False)),
                           progress=not args.no_progress, update_readme=readme, report_picture=picture)


def _check_settings(cfg: BenchmarkConfig) -> None:
    """Refuse to mix results made with other settings (grid size, slice thickness, noise,
    iterations) into ``cfg.output``: resumed jobs would otherwise be silently inconsistent."""
    path = cfg.output / SETTINGS_JSON
    if not path.is_file():
        return
    try:
        theirs = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
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
    from slice2vol import io

    path = cfg.output / SETTINGS_JSON
    if not path.is_file():
        io.write_json({"settings": {k: getattr(cfg, k) for k in _RESULT_SETTINGS},
                       "created": datetime.now().isoformat(timespec="seconds")}, path)
