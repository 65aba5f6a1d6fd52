"""The ``slice2vol`` command line: one parser module, thin wrappers around the library.

Every user-facing failure is a :class:`~slice2vol.errors.Slice2VolError`, printed as one line
(``slice2vol: error: ...``) with exit status 2; nothing is written on failure.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Sequence

from slice2vol import __version__
from slice2vol.errors import Slice2VolError

log = logging.getLogger("slice2vol")

METHODS = ("auto", "svr", "gaussian", "csvr")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _inplane_resolution(text: str) -> str | float:
    if text in ("auto", "stored"):
        return text
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"give auto, stored or a size in mm: {text!r}") from None


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed


def _nonnegative_int(text: str) -> int:
    """An integer ``0 <= n <= 2**63 - 1`` written as digits (``1e23`` or ``1.5`` are not integers)."""
    try:
        v = int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer: {text!r}")
    if v > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1: {text[:40]!r}")
    return v


def _positive_int(text: str) -> int:
    """An integer of at least 1 (``--max-stacks``)."""
    v = _nonnegative_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return v


def _add_selection_options(p: argparse.ArgumentParser, reconstruct: bool = True) -> None:
    """Stack selection (slice2vol.methods.selection): on by default in reconstruct."""
    g = p.add_argument_group("stack selection (README: Stack assessment and selection)")
    x = g.add_mutually_exclusive_group()
    if reconstruct:
        x.add_argument("--keep-all-stacks", action="store_true",
                       help="reconstruct from every stack (default: leave out stacks that clearly disagree with the "
                            "others or whose neighbouring slices disagree, one warning line each; see slice2vol assess)")
    x.add_argument("--max-stacks", type=_positive_int, metavar="N",
                   help="keep only the best N stacks by the combined assessment score (after leaving out outliers)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="compute device: auto picks CUDA when available (default: auto)")
    p.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="random seed; CPU results are deterministic for a seed (default: 0)")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress details")


def _add_reconstruct_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", type=_positive_float, default=0.8, help="output voxel size in mm (default: 0.8)")
    p.add_argument("--output-space", choices=["atlas", "scanner"], default="scanner",
                   help="atlas: register the result rigidly to the shipped CRL 2017 fetal atlas (week chosen by best "
                        "match) and write it on the atlas's axes (RAS, standard planes; week and transform in "
                        "--output-transforms); scanner (default): the template stack's world frame, as acquired")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="reconstruction method: auto (default: classical SVR started from the stack-registered or "
                        "the cSVR network's poses, whichever explains the slices better, with the global pose "
                        "search; robust to large motion), svr (classical SVR from stack registration, with the "
                        "global pose search), gaussian (GaussianSVR, started from auto), csvr (network poses fixed; "
                        "--refine: as auto)")
    p.add_argument("--iterations", type=_nonnegative_int, default=None,
                   help="svr, csvr: outer registration/reconstruction iterations on the output grid (default: 3); "
                        "gaussian: optimisation iterations (default: 30)")
    g = p.add_argument_group("gaussian method (experimental, see README)")
    g.add_argument("--psf", choices=["sampled", "analytic"], default=None,
                   help="gaussian: slices rendered from the PSF-convolved Gaussians directly (analytic, default: "
                        "better and faster in our benchmark) or simulated from a voxelisation through the "
                        "acquisition model (sampled, the GaussianSVR paper's way)")
    g.add_argument("--init", choices=["auto", "stack", "svr", "csvr"], default=None,
                   help="gaussian: start from the default pipeline's (auto, default) or classical SVR's (svr) poses "
                        "and volume, from the stack-registered poses (stack) or from the cSVR network's poses (csvr)")
    g.add_argument("--max-gaussians", type=int, default=None, help="gaussian: cap on the number of Gaussians (default: 150000)")
    g.add_argument("--output-gaussians", metavar="FILE.pt",
                   help="gaussian: also save the Gaussians (world mm) for slice2vol render")
    g = p.add_argument_group("csvr method (see README: the shipped CPU-trained weights are weak)")
    g.add_argument("--refine", action="store_true",
                   help="csvr: refine the network's poses with classical SVR (default: reconstruct with them fixed)")
    g.add_argument("--csvr-start", choices=["auto", "network"], default=None,
                   help="csvr --refine: start SVR from the network's or the stack-registered poses, whichever "
                        "explains the slices better (auto, default), or always from the network's (network)")
    g.add_argument("--weights", metavar="FILE.pt",
                   help="csvr (and gaussian --init csvr): network weights (default: the packaged model)")
    p.add_argument("--packages", nargs="+", type=int, metavar="P",
                   help="interleave packages per stack (one value for all or one per stack; slice k is in package "
                        "k %% P, as SVRTK's -packages): the global pose search then also registers whole packages and "
                        "their halves before single slices (default: from the stack's slice timing where its files give it -- DICOM "
                        "acquisition times, a JSON sidecar's SliceTiming, the NIfTI header -- else 2, an interleaved "
                        "acquisition; give 1 for sequential; given values override the files)")
    p.add_argument("--regularisation", type=float, metavar="LAM",
                   help="relative weight of the super-resolution's edge-preserving smoothness term (svr, auto, csvr; "
                        "SVRTK's -lambda plays this role). Default: from the stacks' estimated noise, 0.02 up to 4 %% "
                        "of the brain intensity and half the relative noise above (logged and in the transforms JSON)")
    p.add_argument("--bias-field", action="store_true", help="N4 bias-field correction of each stack first (SimpleITK)")
    p.add_argument("--inplane-resolution", type=_inplane_resolution, default="auto", metavar="auto|stored|MM",
                   help="in-plane pixel size the stacks were acquired with, which the PSF models: auto (default) "
                        "detects scanner interpolation (k-space zero filling) from each stack's spectrum; stored "
                        "takes the stored pixel spacing (SVRTK's and NeSVoR's convention); MM gives it for every "
                        "stack, e.g. 1.4 for stacks acquired at 1.4 mm and stored at 0.7 mm by bilinear or "
                        "bicubic interpolation, which auto does not detect")
    p.add_argument("--keep-dark-pixels", action="store_true",
                   help="keep pixels darker than both neighbouring slices (default with stack masks: left out as "
                        "signal loss from fetal motion during the slice; see README)")
    p.add_argument("--output-transforms", metavar="JSON", help="write the estimated per-slice poses as JSON")
    p.add_argument("--output-simulated", metavar="DIR",
                   help="write slices simulated from the result, one NIfTI per input stack, into DIR")
    p.add_argument("--report", metavar="DIR",
                   help="write a visual report (DIR/index.html with PNG figures) into DIR (demo default: OUT/report)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--profile", action="store_true",
                   help="print where the run's time went, by stage (prepare, selection, pose search, registration, "
                        "reconstruction, robust statistics, checks); the figures are also in --output-transforms")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 3 when the quality verdict is 'failed' (after writing every output; "
                        "default: warn and exit 0)")
    _add_selection_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slice2vol",
        description="Slice-to-volume reconstruction of motion-corrupted stacks of thick 2D MRI slices.",
    )
    parser.add_argument("--version", action="version", version=f"slice2vol {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("reconstruct", help="reconstruct a volume from stacks",
                       description="Reconstruct one motion-corrected volume from several stacks of slices.")
    p.add_argument("stacks", nargs="+", metavar="STACK",
                   help="input stacks: NIfTI files (slices along the 3rd voxel axis) or folders of DICOM images "
                        "(one series, or several picked with --series-description: one stack each)")
    p.add_argument("--output", "-o", required=True, metavar="OUT.nii.gz", help="output volume (NIfTI)")
    p.add_argument("--stack-masks", nargs="+", metavar="M", help="one brain mask per stack, in each stack's voxel grid")
    p.add_argument("--mask", metavar="M", help="one 3D brain mask in world space (any grid), e.g. drawn on the template stack")
    p.add_argument("--thickness", nargs="+", type=_positive_float, metavar="MM",
                   help="slice thickness in mm: one value for all stacks or one per stack (default: slice spacing; "
                        "DICOM: SliceThickness)")
    p.add_argument("--template", type=int, metavar="I",
                   help="index (0-based) of the template stack (default: automatic, least motion-corrupted)")
    p.add_argument("--series-description", action="append", metavar="PATTERN",
                   help="DICOM folders: use the series whose SeriesDescription matches PATTERN (fnmatch: * and ?, "
                        "case-insensitive; repeat the option for several patterns); each matching series is one "
                        "stack, in SeriesNumber order, and per-stack options count these stacks")
    p.add_argument("--output-dicom", metavar="DIR",
                   help="also write the output volume as a derived DICOM MR series (one file per slice) into DIR "
                        "(new or empty; patient and study tags from the input series when they are DICOM)")
    _add_reconstruct_options(p)
    _add_common(p)

    p = sub.add_parser("demo", help="reconstruct the bundled demo case",
                       description="Reconstruct the demo stacks shipped with slice2vol and evaluate against their ground truth.")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder")
    _add_reconstruct_options(p)
    _add_common(p)

    p = sub.add_parser("simulate", help="simulate motion-corrupted stacks from a volume",
                       description="Simulate stacks of thick slices with motion from a ground-truth volume.")
    p.add_argument("volume", metavar="GT", help="ground-truth volume (NIfTI)")
    p.add_argument("--mask", metavar="M", help="brain mask of GT (same grid); defines the field of view and stack masks")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder")
    p.add_argument("--stacks", type=int, default=3, help="number of stacks (default: 3)")
    p.add_argument("--orientations", nargs="+", metavar="O",
                   help="orientation per stack: axial, coronal, sagittal or oblique (default: cycle axial, coronal, sagittal, oblique)")
    p.add_argument("--spacing", type=_positive_float, default=1.0, help="in-plane pixel spacing mm (default: 1.0)")
    p.add_argument("--thickness", type=_positive_float, default=3.0, help="slice thickness mm (default: 3.0)")
    p.add_argument("--gap", type=float, default=0.0, help="gap between slices mm (default: 0)")
    p.add_argument("--motion", default="moderate", metavar="LEVEL",
                   help="motion level: none, mild, moderate, severe, extreme (random walk with abrupt jumps, "
                        "median slice rotation ~16 deg), csvr (the cSVR paper's training distribution), "
                        "or rot<deg> / trans<mm> for one magnitude of the sweep (default: moderate)")
    p.add_argument("--noise", type=float, default=0.02, help="Rician noise sd relative to mean brain intensity (default: 0.02)")
    p.add_argument("--bias", type=float, default=0.0, help="amplitude of a smooth multiplicative bias field (default: 0)")
    p.add_argument("--gamma", type=float, default=0.0, help="sd of a random gamma intensity change (default: 0)")
    p.add_argument("--tilt", type=float, default=15.0, help="tilt of oblique stacks in degrees (default: 15)")
    p.add_argument("--slice-bias", type=float, default=0.0,
                   help="amplitude of an extra slice-wise smooth bias field, as in cSVR training (default: 0)")
    p.add_argument("--interleave", type=int, default=2,
                   help="interleave step of the acquisition order, 1 = sequential (default: 2)")
    p.add_argument("--signal-loss", type=float, default=0.0, metavar="FRACTION",
                   help="fraction of every stack's slices darkened, wholly or in a band, as by fetal motion during "
                        "a single-shot slice (default: 0)")
    p.add_argument("--turn", type=float, default=0.0, metavar="DEG",
                   help="a lasting turn of the fetus by DEG degrees (up to 180) during one random stack, on top of "
                        "--motion (default: 0, none)")
    p.add_argument("--slice-profile", default="gaussian", choices=["gaussian", "box"],
                   help="slice profile the stacks are rendered with: gaussian (the reconstruction's PSF model) or box "
                        "(a rectangular slab and pixel, a profile the reconstruction does not model) (default: gaussian)")
    p.add_argument("--zero-fill", type=int, default=1, choices=[1, 2, 3, 4], metavar="FACTOR",
                   help="store every stack interpolated in-plane by zero filling its spectrum to FACTOR times the "
                        "pixels (a scanner's interpolation: acquired at --spacing, stored at --spacing / FACTOR; "
                        "default 1: stored as acquired)")
    p.add_argument("--margin", type=float, default=10.0, help="field-of-view margin around the mask in mm (default: 10)")
    _add_common(p)

    p = sub.add_parser("evaluate", help="compare a reconstruction with a reference",
                       description="Image metrics against a reference volume, pose errors, and slice consistency.")
    p.add_argument("recon", metavar="RECON", help="reconstructed volume (NIfTI)")
    p.add_argument("--reference", metavar="GT", help="reference volume (NIfTI)")
    p.add_argument("--mask", metavar="M", help="mask in the reference grid limiting the metrics")
    p.add_argument("--align", action="store_true", help="rigidly align RECON to the reference before comparing (SimpleITK, independent of the methods' registration)")
    p.add_argument("--no-scale", action="store_true", help="do not fit a linear intensity map RECON -> GT")
    p.add_argument("--poses", metavar="JSON", help="estimated poses (from --output-transforms) for TRE")
    p.add_argument("--gt-poses", metavar="JSON", help="ground-truth poses (from simulate) for TRE")
    p.add_argument("--stacks", nargs="+", metavar="STACK", help="acquired stacks for slice consistency (uses --poses)")
    p.add_argument("--stack-masks", nargs="+", metavar="M", help="one mask per --stacks entry (only masked pixels count)")
    p.add_argument("--thickness", nargs="+", type=_positive_float, metavar="MM", help="slice thickness of --stacks")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    _add_common(p)

    p = sub.add_parser("render", help="voxelise saved Gaussians at any resolution",
                       description="Render Gaussians saved by reconstruct --method gaussian --output-gaussians "
                                   "onto a world-axis-aligned grid at --resolution (over the saved ROI box, or "
                                   "the grid of --like).")
    p.add_argument("gaussians", metavar="FILE.pt", help="saved Gaussians")
    p.add_argument("--output", "-o", required=True, metavar="OUT.nii.gz", help="output volume (NIfTI)")
    p.add_argument("--resolution", type=_positive_float, default=None, help="voxel size mm (default: as reconstructed)")
    p.add_argument("--like", metavar="REF.nii.gz", help="render on the grid of this volume instead")
    _add_common(p)

    p = sub.add_parser("report", help="write the visual report of a reconstruction folder",
                       description="Rebuild the HTML report (index.html with PNG figures) of a reconstruction from "
                                   "RECON_DIR: a folder written by reconstruct --report (its report_data.json; "
                                   "rewritten in place) or a folder holding the --output-transforms JSON "
                                   "(report written into RECON_DIR/report).  The input stacks and the output "
                                   "volume are read from the paths recorded there.")
    p.add_argument("recon_dir", metavar="RECON_DIR", help="reconstruction or report folder")
    p.add_argument("--output", "-o", metavar="DIR", help="report folder (default: see above)")
    _add_common(p)

    p = sub.add_parser("assess", help="assess stacks: motion, agreement, coverage, keep/drop",
                       description="Print per stack: neighbour-slice NCC and interleave discontinuity (motion), "
                                   "agreement with the other stacks after rigid registration, brain coverage, a "
                                   "combined score, and the keep/drop decision reconstruct would make (with its "
                                   "reason).")
    p.add_argument("stacks", nargs="+", metavar="STACK",
                   help="input stacks: NIfTI files (slices along the 3rd voxel axis) or folders of DICOM images")
    p.add_argument("--stack-masks", nargs="+", metavar="M", help="one brain mask per stack, in each stack's voxel grid")
    p.add_argument("--mask", metavar="M", help="one 3D brain mask in world space (any grid)")
    p.add_argument("--series-description", action="append", metavar="PATTERN",
                   help="DICOM folders: assess the series whose SeriesDescription matches PATTERN (as in reconstruct)")
    p.add_argument("--thickness", nargs="+", type=_positive_float, metavar="MM",
                   help="slice thickness in mm: one value for all stacks or one per stack (default: slice spacing)")
    p.add_argument("--template", type=int, metavar="I", help="a stack (0-based) that is never left out")
    _add_selection_options(p, reconstruct=False)
    p.add_argument("--json", metavar="FILE", help="also write the assessment as JSON")
    _add_common(p)

    _add_benchmark_parser(sub)
    add_train_csvr_parser(sub)
    _add_batch_parser(sub)
    return parser


def _add_batch_parser(sub) -> None:
    p = sub.add_parser(
        "batch", help="reconstruct every subject of a BIDS dataset on dask.distributed",
        description="Reconstruct every subject/session of a BIDS dataset (sub-*/[ses-*/]anat/*_T2w.nii.gz), one "
                    "dask task each, into a BIDS derivatives folder. Any reconstruct option (--method, --resolution, "
                    "--thickness, --device, ...) may follow and applies to every subject. Resumable: unchanged "
                    "subjects are not recomputed. Exit status 1 when any subject failed.")
    p.add_argument("bids_root", metavar="BIDS_ROOT", help="BIDS dataset (with dataset_description.json)")
    p.add_argument("--output", "-o", required=True, metavar="DERIV_DIR", help="derivatives folder (created; reused)")
    p.add_argument("--participant-label", nargs="+", metavar="L", help="only these subjects (labels, sub- optional)")
    p.add_argument("--session", nargs="+", metavar="S", help="only these sessions")
    p.add_argument("--masks", metavar="MASK_DERIV_DIR",
                   help="derivatives with <stem>_desc-brain_mask.nii.gz per stack (default: no masks)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="a running dask scheduler, e.g. tcp://host:8786 "
                   "(default: a LocalCluster on this machine)")
    p.add_argument("--workers", type=int, metavar="N", help="LocalCluster worker processes (default: cores / threads-per-worker)")
    p.add_argument("--threads-per-worker", type=int, default=1, metavar="T", help="torch threads per worker (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress details")


def add_train_csvr_parser(sub) -> argparse.ArgumentParser:
    """``train-csvr``: the options are defined here, once (building the parser does not import torch);
    the work is :func:`slice2vol.training.csvr.train_command`."""
    p = sub.add_parser(
        "train-csvr", help="train the cSVR network on simulated stacks",
        description="Train the cSVR pose network on stacks simulated on the fly from the CRL 2017 atlases "
                    "(validation on the spina-bifida atlases). Resumable: rerun with the same --output.")
    add_train_csvr_arguments(p)
    return p


def add_train_csvr_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``slice2vol train-csvr`` (see :mod:`slice2vol.training.csvr`)."""
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for checkpoint.pt and log.csv")
    p.add_argument("--data", metavar="DIR", help="shared data folder (default: $SLICE2VOL_SHARED, else shared/data beside the checkout, else ../shared/data; slice2vol.io.shared_data_dir)")
    p.add_argument("--steps", type=int, default=250_000, help="total steps of the poly schedule (default: 250000, the paper's)")
    p.add_argument("--lr", type=float, default=1e-4, help="initial Adam learning rate (default: 1e-4, the paper's)")
    p.add_argument("--motion", default="csvr",
                   help="simulated motion level, or a comma list sampled uniformly per step "
                        "(default: csvr, the paper's distribution)")
    p.add_argument("--val-motion", default="csvr", help="motion level of the validation cases (default: csvr)")
    p.add_argument("--init-weights", metavar="PT",
                   help="start a new run from exported weights (e.g. the packaged model) instead of at random; "
                        "ignored when OUTPUT/checkpoint.pt exists")
    p.add_argument("--atlas-resolution", type=float, default=1.6, help="mm grid the training atlases are simulated from (default: 1.6)")
    p.add_argument("--val-every", type=int, default=200, help="steps between validations (default: 200)")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this much wall time")
    p.add_argument("--deadline", default=None, help="stop (and checkpoint) at this UTC time, HH:MM")
    p.add_argument("--export", metavar="PT", help="after training write float16 weights to this file")
    p.add_argument("--literal-loss", action="store_true", help="eq. 9 exactly as printed (see multilayer_loss)")
    p.add_argument("--channels", default=None, help="encoder channels fine to coarse, e.g. 8,16,24,32,32")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress details")


def _add_benchmark_parser(sub) -> None:
    """``benchmark``: lists are comma-separated (``--motion mild,moderate``) and checked by
    :func:`slice2vol.evaluation.benchmark.config_from_args`, so a bad value is one ``slice2vol: error:`` line."""
    p = sub.add_parser("benchmark", help="benchmark methods on simulated atlas cases with ground truth",
                       description="Simulate cases from fetal brain atlases (once per atlas x motion x seed), "
                                   "reconstruct each with every method in its own worker process (dask.distributed tasks: a "
                                   "LocalCluster, or --scheduler), evaluate against "
                                   "the ground truth, and write results.csv, results.md (mean ± sd per method and "
                                   "motion level) and PNG plots into --output.  Resumable: a finished "
                                   "(case, method) job is not recomputed.")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder (created; reused on reruns)")
    p.add_argument("--atlases", nargs="+", metavar="A",
                   help="atlas names, comma-separated: CRL 2017 (STA21..STA38) or spina-bifida 2021 (e.g. "
                        "GA27_operated, never seen by cSVR's training), or a split name of slice2vol.simulation.splits: "
                        "train (the 18 CRL atlases), validation (3 spina-bifida atlases, for tuning) or test "
                        "(the other 12, never tuned on) (default: STA23,STA29,STA35)")
    p.add_argument("--motion", nargs="+", metavar="LEVEL",
                   help="motion levels: none, mild, moderate, severe, extreme (random walk with jumps; its cases "
                        "also get 1-4 interleave packages and stacks tilted up to 15 deg), csvr, rot<deg>, "
                        "trans<mm> (default: mild,moderate,severe)")
    p.add_argument("--seeds", nargs="+", metavar="S", help="simulation seeds, comma-separated (default: 0,1)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="method variant names of slice2vol.methods.run.METHOD_VARIANTS, comma-separated (default: every "
                        "plain method name, i.e. without '-'); the naive baseline is always added")
    p.add_argument("--data", metavar="DIR",
                   help="shared data folder holding fetal_atlases/{crl2017,spina_bifida2021} (default: $SLICE2VOL_SHARED, else shared/data beside the checkout, else ../shared/data; slice2vol.io.shared_data_dir)")
    p.add_argument("--resolution", type=float, default=0.8, help="reconstruction voxel size in mm (default: 0.8)")
    p.add_argument("--thickness", type=float, default=3.0, help="simulated slice thickness in mm (default: 3)")
    p.add_argument("--noise", type=float, default=0.02,
                   help="simulated Rician noise sd relative to the mean brain intensity (default: 0.02)")
    p.add_argument("--iterations", type=int, default=None, help="outer iterations of every method (default: each method's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="compute device of the workers: auto picks CUDA when available (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the jobs on a running dask scheduler, e.g. tcp://host:8786 (workers must see --output "
                        "and --data at the same paths); default: a LocalCluster on this machine")
    p.add_argument("--workers", type=int, metavar="N",
                   help="LocalCluster worker processes, jobs run at once (default: cores / --threads, so 1 "
                        "without --threads)")
    p.add_argument("--update-readme", metavar="README",
                   help="afterwards copy results.md and the plots into README between <!-- benchmark:start/end --> "
                        "markers (pictures into benchmarks/results/ beside it)")
    p.add_argument("--report-picture", metavar="PNG",
                   help="with --update-readme: also show this report picture (e.g. REPORT_DIR/views.png) between "
                        "<!-- report-picture:start/end --> markers")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress details")


def _dispatch(args: argparse.Namespace) -> int:
    from slice2vol.core.runtime import setup_logging

    setup_logging(args.verbose)
    if args.command == "reconstruct":
        from slice2vol.cli.commands import reconstruct_command
        return reconstruct_command(args)
    if args.command == "demo":
        from slice2vol.cli.commands import demo_command
        return demo_command(args)
    if args.command == "simulate":
        from slice2vol.simulation.simulate import simulate_command
        return simulate_command(args)
    if args.command == "evaluate":
        from slice2vol.evaluation.metrics import evaluate_command
        return evaluate_command(args)
    if args.command == "assess":
        from slice2vol.cli.assess import assess_command
        return assess_command(args)
    if args.command == "render":
        from slice2vol.cli.commands import render_command
        return render_command(args)
    if args.command == "report":
        from slice2vol.report import report_command
        return report_command(args)
    if args.command == "benchmark":
        from slice2vol.evaluation.benchmark import benchmark_command
        return benchmark_command(args)
    if args.command == "batch":
        from slice2vol.cli.batch import batch_command
        return batch_command(args)
    if args.command == "train-csvr":
        from slice2vol.training.csvr import train_command
        return train_command(args)
    raise Slice2VolError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:
        # batch forwards every option it does not know to reconstruct (checked there, up front)
        args, extra = parser.parse_known_args(argv)
        args.reconstruct_options = extra
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # SIGTERM (kill, a batch scheduler, a container stop) raises KeyboardInterrupt like Ctrl-C, so
    # the same clean-up runs: temporary files and the outputs of an unfinished run are removed.
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    installed = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if installed else None
    try:
        return int(_dispatch(args) or 0)
    except Slice2VolError as exc:
        print(f"slice2vol: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if terminated:
            print("slice2vol: terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("slice2vol: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("slice2vol: error: out of memory (try a coarser --resolution or --device cpu)", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # torch.OutOfMemoryError is one; the CPU allocator raises a plain one
        text = " ".join(str(exc).split())
        if type(exc).__name__ != "OutOfMemoryError" and "DefaultCPUAllocator" not in text and "out of memory" not in text:
            raise
        # The allocator's message starts with a C++ source location ("[enforce fail at alloc_cpu.cpp:..] ...").
        text = text.split("] ", 1)[1] if text.startswith("[enforce fail") and "] " in text else text
        print(f"slice2vol: error: out of memory: {text[:300]} (try a coarser --resolution)", file=sys.stderr)
        return 1
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
