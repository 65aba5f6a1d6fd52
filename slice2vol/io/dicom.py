"""DICOM input and output: classic single-frame MR series <-> stacks and volumes (pydicom).

Reading
    A stack argument that is a folder is searched (with its sub-folders; hidden ones skipped) for
    DICOM files (files with the ``DICM`` preamble; anything else, a ``DICOMDIR`` included, is left
    out), grouped by ``SeriesInstanceUID``.  A folder holding one series is that series; from a
    folder of several, ``--series-description PATTERN`` (fnmatch, case-insensitive, on the whole
    ``SeriesDescription``; several patterns: any may match) picks one or more, in ``SeriesNumber``
    order.  Each series becomes one stack, geometry exactly from the headers:

    * voxel ``(i, j, k)`` is column ``i``, row ``j`` of the ``k``-th image in order of position
      along the slice normal ``n = row cosine x column cosine`` (never the file name, the
      ``InstanceNumber`` or ``SliceLocation``), so ``data[i, j, k] = pixel_array_k[j, i]``;
    * the affine (LPS, as DICOM stores it) has columns ``row cosine * column spacing``
      (``PixelSpacing[1]``), ``column cosine * row spacing`` (``PixelSpacing[0]``), the step from
      the first to the last ``ImagePositionPatient`` over ``N - 1`` (``n * SliceThickness`` for one
      image) and the first image's position; it is turned to RAS (nibabel's world) by negating
      its first two rows.  It is right-handed by construction, so no axis is ever flipped;
    * intensities are ``RescaleSlope * stored + RescaleIntercept`` (pydicom's modality LUT),
      float32; compressed transfer syntaxes are decoded by pydicom's pixel handlers: RLE Lossless
      and deflate always, JPEG (baseline, extended, lossless, JPEG-LS) and JPEG 2000 with the
      optional decoders of ``pip install "slice2vol[dicom-compressed]"`` (pylibjpeg); without
      them such a series is refused with a line that names its syntax and that command;
    * the thickness is ``SliceThickness``, else the spacing of the positions (``SpacingBetweenSlices``
      only for a one-image series: it is by definition that spacing, and writers that put something
      else there exist -- SimpleITK / GDCM writing 2D slices put 1 -- so a value that disagrees with
      the positions is logged and not used);
    * the acquisition order, where every image has its own acquisition time
      (:mod:`slice2vol.io.timing`: ``AcquisitionDateTime``, ``AcquisitionTime``, an enhanced frame's
      ``FrameAcquisitionDateTime``), becomes the stack's ``order``; the package search then groups
      slices by the packages actually acquired instead of assuming two.

    * an Enhanced MR Image or Legacy Converted Enhanced MR Image file (one file, many frames, as
      recent scanner software exports) is read frame by frame: each frame is an image whose
      position, orientation, pixel spacing, thickness and rescale come from its functional groups
      (per-frame, else shared; :data:`FRAME_GROUPS`), and the frames of a series then go through
      everything above and below exactly as single-frame images do (so a file holding several
      stacks, echoes or orientations is refused as a series holding them would be).

    Refused, each with one line: no DICOM file; non-MR ``Modality``; Enhanced MR Color,
    MR Spectroscopy, or a classic image with ``NumberOfFrames > 1``; colour images; missing
    geometry tags; mixed orientations, pixel spacing, image size or slice thickness inside one
    series; two images at one position (several echoes, repetitions or acquisitions in one
    series); missing slices or otherwise uneven position spacing; slices not stacked along their
    normal (gantry tilt: the voxel grid would be sheared); several series and no (or no matching)
    ``--series-description``.

Writing
    :func:`write_series` writes a volume (or a stack) as an MR Image Storage series, one file per
    slice, explicit VR little endian, uint16 (int16 if any value is negative) with one
    ``RescaleSlope`` for the whole series (maximum |value| / 65535 or / 32767), so intensities
    survive to about 1e-5 of the maximum.  A derived series has ``ImageType DERIVED\\SECONDARY\\OTHER``,
    new Series/SOP Instance UIDs (:func:`pydicom.uid.generate_uid`), and the patient, study and
    frame-of-reference tags of the input series it derives from (anonymous defaults and new
    UIDs without one).  The folder is written as a hidden temporary folder beside it and renamed
    into place; it must not exist or be empty, and may not be or lie inside or around an input.
"""
from __future__ import annotations

import contextlib
import datetime
import fnmatch
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from slice2vol.core import budget
from slice2vol.core.geometry import check_affine
from slice2vol.errors import Slice2VolError
from slice2vol.io.timing import dicom_order

__all__ = [
    "SeriesRef",
    "DicomSeries",
    "find_series",
    "read_series",
    "read_dicom_folder",
    "check_output_folder",
    "write_series",
    "SOURCE_TAGS",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Enhanced (multi-frame) MR SOP classes.  The first two are read frame by frame (module docstring);
#: the others are refused with a hint.
ENHANCED_MR = {
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color Image",
    "1.2.840.10008.5.1.4.1.1.4.2": "MR Spectroscopy",
}
ENHANCED_READ = ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")
#: Functional-group sequence -> the attributes a frame takes from it (per-frame group first, else shared).
FRAME_GROUPS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
    "FrameContentSequence": ("FrameAcquisitionDateTime",),
}
#: Attributes of the enhanced file every frame keeps (with :data:`SOURCE_TAGS`).
FRAME_KEEP = ("SOPClassUID", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
              "BitsStored", "HighBit", "PixelRepresentation", "ImageType")
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR

#: LPS (DICOM patient coordinates) <-> RAS (nibabel's world): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Direction cosines of two images "agree" within this (DS strings keep 10-16 digits; scanners
#: write 5-6 decimals).
ORIENTATION_TOL = 1e-4
#: Pixel spacings and thicknesses agree within this (mm).
SPACING_TOL = 1e-3
#: Slice positions must lie on the fitted line within this fraction of the smallest voxel size.
POSITION_TOL = 0.01
#: |cos| between the slice step and the normal above which a series is called sheared (the same
#: tolerance :func:`slice2vol.core.geometry.check_affine` allows a NIfTI affine).
SHEAR_TOL = 1e-3

#: Tags of the input series a derived series carries over (patient, study, frame of reference)
#: and that identify it.
SOURCE_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "FrameOfReferenceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "Modality", "Manufacturer", "MagneticFieldStrength", "InstitutionName", "PatientPosition",
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime",
    "EchoTrainLength",
)


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - a dependency of slice2vol
        raise Slice2VolError("DICOM input/output needs pydicom (pip install pydicom)") from None
    return pydicom


#: The optional decoders for compressed transfer syntaxes (``pip install "slice2vol[dicom-compressed]"``):
#: pylibjpeg with its libjpeg (JPEG baseline, extended, lossless, JPEG-LS) and openjpeg (JPEG 2000)
#: plugins.  pydicom itself decodes RLE Lossless and deflated files.
COMPRESSED_EXTRA = "dicom-compressed"


def _pixel_error(where: str, path: Path, ds, exc: Exception) -> str:
    """One line for pixel data that cannot be read; for a compressed transfer syntax with no
    installed decoder it names the syntax and what to install."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) if ds is not None else None
    if ts is not None and getattr(ts, "is_compressed", False):
        return (f"{where}: {path.name} is compressed ({ts.name}) and no installed decoder could read it "
                f"({_one_line(exc)[:120]}); install the optional decoders with "
                f"pip install \"slice2vol[{COMPRESSED_EXTRA}]\", or decompress the series first "
                f"(e.g. gdcmconv --raw or dcmdjpeg)")
    return f"{where}: cannot read the pixel data of {path.name} ({_one_line(exc)[:160]})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _text(v) -> str:
    """A DICOM value as one plain string (multi-values joined by backslash, as DICOM writes them)."""
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


# ------------------------------------------------------------------------------------ reading


@dataclass
class SeriesRef:
    """One series of a folder, headers only (nothing is validated yet).

    Attributes:
        folder: the folder given on the command line.
        uid: ``SeriesInstanceUID``.
        files: the series' files with their headers (pydicom datasets without pixel data).
    """

    folder: Path
    uid: str
    files: list[tuple[Path, object]]

    @property
    def number(self) -> int | None:
        v = self.files[0][1].get("SeriesNumber")
        try:
            return int(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            return None

    @property
    def description(self) -> str:
        return _text(self.files[0][1].get("SeriesDescription")).strip()

    def label(self) -> str:
        """``series 5 'T2 HASTE COR' (40 images)`` (``(40 frames in 1 file)`` for an enhanced file):
        how messages name the series."""
        num = f"series {self.number}" if self.number is not None else "series"
        desc = f" '{self.description}'" if self.description else " (no SeriesDescription)"
        n, n_files = len(self.files), len({p for p, _ in self.files})
        if n_files < n:  # enhanced multi-frame files
            return f"{num}{desc} ({n} frames in {n_files} file{'s' if n_files != 1 else ''})"
        return f"{num}{desc} ({n} image{'s' if n != 1 else ''})"

    def sort_key(self):
        return (self.number if self.number is not None else 1 << 62, self.description, self.uid)


@dataclass
class DicomSeries:
    """One series read as a stack.

    Attributes:
        data: ``(H, W, N)`` float32 (``H`` = Columns along voxel axis ``i``, ``W`` = Rows), after
            rescale, slices in order of position along the normal.
        affine: ``(4, 4)`` float64 voxel-to-world (mm, RAS), right-handed.
        thickness: mm, from ``thickness_source``.
        thickness_source: ``SliceThickness``, ``SpacingBetweenSlices`` or ``slice positions``.
        slice_spacing: mm between consecutive slice positions (``SliceThickness`` for one image).
        name: a file-name-safe label (series description and number).
        meta: :data:`SOURCE_TAGS` present in the first image, as plain strings/numbers.
        files: the image files in slice order.
        order: ``(N,)`` acquisition time rank of every slice where the images' acquisition times
            give it, else ``None`` (:func:`slice2vol.io.timing.dicom_order`); ``order_source``
            names the tag.
    """

    data: np.ndarray
    affine: np.ndarray
    thickness: float
    thickness_source: str
    slice_spacing: float
    name: str
    meta: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    order: np.ndarray | None = None
    order_source: str = ""


def _dicom_files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # our own temporary folders too
        out += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return out


def _has_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _frames(ds, where: str) -> list:
    """An enhanced MR file's frames, each as a header of its own: the file's :data:`FRAME_KEEP` and
    :data:`SOURCE_TAGS`, and the geometry and rescale of its functional groups (:data:`FRAME_GROUPS`,
    the per-frame group before the shared one).  ``frame_index`` (0-based) says which frame."""
    from pydicom.dataset import Dataset

    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise Slice2VolError(f"{where}: NumberOfFrames is {_text(ds.get('NumberOfFrames'))!r}, not a number") from None
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n:
        raise Slice2VolError(f"{where}: {len(per_frame)} per-frame functional groups for {n} frames")
    frames = []
    for f in range(n):
        out = Dataset()
        for key in (*FRAME_KEEP, *SOURCE_TAGS):
            if key in ds:
                setattr(out, key, ds.get(key))
        for seq, keys in FRAME_GROUPS.items():
            for groups in (per_frame[f] if per_frame else None, shared):
                item = (groups.get(seq) or [None])[0] if groups is not None else None
                if item is not None and any(k in item for k in keys):
                    for k in keys:
                        if k in item:
                            setattr(out, k, item.get(k))
                    break
        out.frame_index = f
        frames.append(out)
    return frames


def _image_name(p: Path, ds) -> str:
    """How messages name one image: the file name, and the frame of an enhanced file."""
    f = getattr(ds, "frame_index", None)
    return p.name if f is None else f"{p.name} frame {f + 1}"


def _scan(folder: Path, what: str) -> dict[str, list[tuple[Path, object]]]:
    """Headers of every DICOM file under ``folder``, grouped by ``SeriesInstanceUID``."""
    pydicom = _pydicom()
    groups: dict[str, list[tuple[Path, object]]] = {}
    skipped = 0
    for p in _dicom_files(folder):
        if not _has_preamble(p):
            skipped += 1
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for truncated or corrupt files
            raise Slice2VolError(f"{what} {folder}: {p.name} is not a readable DICOM file ({_one_line(exc)[:160]})") from None
        sop = _text(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID"))
        if sop == MEDIA_DIRECTORY:
            skipped += 1
            continue
        uid = _text(ds.get("SeriesInstanceUID")).strip()
        if not uid:
            raise Slice2VolError(f"{what} {folder}: {p.name} has no SeriesInstanceUID")
        if _text(ds.get("SOPClassUID")).strip() in ENHANCED_READ:
            groups.setdefault(uid, []).extend((p, f) for f in _frames(ds, f"{what} {folder}: {p.name}"))
        else:
            groups.setdefault(uid, []).append((p, ds))
    if skipped:
        log.debug("%s %s: %d non-DICOM files left out", what, folder, skipped)
    return groups


def _pattern_matches(patterns: Sequence[str], description: str) -> bool:
    d = description.lower()
    return any(fnmatch.fnmatchcase(d, p.lower()) for p in patterns)


def find_series(folder: PathLike, series_description: Sequence[str] | str | None = None,
                what: str = "stack", series_uid: str | None = None) -> list[SeriesRef]:
    """The series of ``folder`` to read: its only series, or those matching ``series_description``.

    Args:
        folder: a folder holding DICOM files (searched with its sub-folders).
        series_description: ``None``, a pattern or several (fnmatch, case-insensitive, on the whole
            ``SeriesDescription``; a series is picked if any matches).
        series_uid: pick exactly the series with this ``SeriesInstanceUID`` instead (how a recorded
            run names its stacks, e.g. for ``slice2vol report``).
    Returns:
        the picked series in ``SeriesNumber`` order (at least one).
    """
    folder = Path(folder)
    patterns = [series_description] if isinstance(series_description, str) else list(series_description or [])
    groups = _scan(folder, what)
    if not groups:
        raise Slice2VolError(f"{what} {folder}: is a directory holding no DICOM files (expected a NIfTI file or a "
                             f"folder of DICOM images)")
    series = sorted((SeriesRef(folder, uid, files) for uid, files in groups.items()), key=SeriesRef.sort_key)
    listing = "; ".join(s.label() for s in series)
    if series_uid is not None:
        picked = [s for s in series if s.uid == series_uid]
        if not picked:
            raise Slice2VolError(f"{what} {folder}: holds no series with SeriesInstanceUID {series_uid} (the folder "
                                 f"changed since it was recorded?); it holds {listing}")
        return picked
    if patterns:
        picked = [s for s in series if _pattern_matches(patterns, s.description)]
        if not picked:
            pats = " or ".join(repr(p) for p in patterns)
            raise Slice2VolError(f"{what} {folder}: no series matches --series-description {pats} (fnmatch, "
                                 f"case-insensitive); the folder holds {listing}")
        return picked
    if len(series) > 1:
        raise Slice2VolError(f"{what} {folder}: holds {len(series)} series ({listing}); pick with "
                             f"--series-description PATTERN (fnmatch, case-insensitive, e.g. '*T2*')")
    return series


def _floats(ds, key: str, n: int, where: str) -> np.ndarray:
    v = ds.get(key)
    try:
        arr = np.array([float(x) for x in v], dtype=np.float64) if v is not None else None
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.all(np.isfinite(arr)):
        got = "missing" if v is None else f"{_text(v)[:60]!r}"
        raise Slice2VolError(f"{where}: {key} is {got}; {n} numbers needed for the slice geometry")
    return arr


def _positive(ds, key: str) -> float | None:
    v = ds.get(key)
    try:
        x = float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return x if x is not None and np.isfinite(x) and x > 0 else None


def _meta(ds) -> dict:
    out = {}
    for key in SOURCE_TAGS:
        v = ds.get(key)
        if v is None or v == "":
            continue
        if key in ("SeriesNumber", "EchoTrainLength"):
            try:
                out[key] = int(v)
                continue
            except (TypeError, ValueError):
                pass
        out[key] = _text(v)
    return out


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:60]


def _check_series_headers(ref: SeriesRef, where: str) -> None:
    """Refuse what slice2vol cannot read as one stack of parallel single-frame MR images."""
    headers = [ds for _, ds in ref.files]
    modalities = sorted({_text(ds.get("Modality")).strip() or "(none)" for ds in headers})
    if modalities != ["MR"]:
        raise Slice2VolError(f"{where}: Modality is {', '.join(modalities)}, not MR; slice2vol reconstructs MR "
                             f"stacks only")
    for p, ds in ref.files:
        sop = _text(ds.get("SOPClassUID")).strip()
        frames = ds.get("NumberOfFrames")
        try:
            n_frames = int(frames) if frames not in (None, "") else 1
        except (TypeError, ValueError):
            n_frames = 1
        if sop not in ENHANCED_READ and (sop in ENHANCED_MR or n_frames > 1):
            kind = ENHANCED_MR.get(sop, "multi-frame image")
            raise Slice2VolError(f"{where}: {_image_name(p, ds)} is an {kind} ({n_frames} frames), which slice2vol "
                                 f"does not read (it reads classic MR images and Enhanced MR Image frames): export "
                                 f"the series as classic single-frame MR images (or convert it to NIfTI, e.g. with "
                                 f"dcm2niix)")
        spp = ds.get("SamplesPerPixel", 1)
        if spp not in (None, "") and int(spp) != 1:
            raise Slice2VolError(f"{where}: {_image_name(p, ds)} has {int(spp)} samples per pixel (colour); MR "
                                 f"magnitude images (one sample per pixel) are needed")
        if _text(ds.get("PhotometricInterpretation")).strip() == "MONOCHROME1":
            raise Slice2VolError(f"{where}: {_image_name(p, ds)} is MONOCHROME1 (inverted grey scale), not supported")
    sizes = sorted({(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for ds in headers})
    if len(sizes) > 1:
        raise Slice2VolError(f"{where}: mixed image sizes (rows x columns {', '.join(f'{r}x{c}' for r, c in sizes)}) "
                             f"in one series")
    if min(sizes[0]) < 2:
        raise Slice2VolError(f"{where}: images of {sizes[0][0]} x {sizes[0][1]} pixels are too small")


def _geometry(ref: SeriesRef, where: str):
    """``(order, affine_lps, slice_spacing, thickness, thickness_source)`` of a series: the images'
    order by position, the LPS voxel-to-world affine, the spacing of the slice positions (mm), and
    the slice thickness (mm) with where it came from (module docstring)."""
    iop = np.array([_floats(ds, "ImageOrientationPatient", 6, f"{where}: {_image_name(p, ds)}")
                    for p, ds in ref.files])
    if np.abs(iop - iop[0]).max() > ORIENTATION_TOL:
        bad = int(np.argmax(np.abs(iop - iop[0]).max(axis=1)))
        angle = np.degrees(np.arccos(np.clip(min(iop[0, :3] @ iop[bad, :3], iop[0, 3:] @ iop[bad, 3:]), -1, 1)))
        raise Slice2VolError(f"{where}: mixed orientations in one series ({_image_name(*ref.files[bad])} is turned "
                             f"{angle:.1f} deg from {_image_name(*ref.files[0])}); a stack must have parallel slices "
                             f"(a localizer? pick another series)")
    row_cos, col_cos = iop[0, :3], iop[0, 3:]
    if (abs(np.linalg.norm(row_cos) - 1) > ORIENTATION_TOL * 10 or abs(np.linalg.norm(col_cos) - 1) > ORIENTATION_TOL * 10
            or abs(row_cos @ col_cos) > ORIENTATION_TOL * 10):
        raise Slice2VolError(f"{where}: ImageOrientationPatient {_text(iop[0].round(6).tolist())} is not two "
                             f"orthogonal unit vectors")
    # The affine keeps the cosines as written (the poses take the nearest rotation to its columns,
    # as for a NIfTI affine, see geometry.stack_slice_poses); the unit normal only sorts and checks.
    normal = np.cross(row_cos, col_cos)
    normal = normal / np.linalg.norm(normal)

    ps = np.array([_floats(ds, "PixelSpacing", 2, f"{where}: {_image_name(p, ds)}") for p, ds in ref.files])
    if np.any(ps <= 0):
        raise Slice2VolError(f"{where}: PixelSpacing {_text(ps[np.argmin(ps.min(1))].tolist())} is not positive")
    if np.abs(ps - ps[0]).max() > SPACING_TOL:
        values = sorted({tuple(np.round(x, 4)) for x in ps})
        raise Slice2VolError(f"{where}: mixed pixel spacings in one series ({', '.join(f'{a:g} x {b:g} mm' for a, b in values)})")
    th = [_positive(ds, "SliceThickness") for _, ds in ref.files]
    known = [t for t in th if t is not None]
    if known and max(known) - min(known) > SPACING_TOL:
        raise Slice2VolError(f"{where}: mixed SliceThickness in one series ({min(known):g} to {max(known):g} mm)")

    ipp = np.array([_floats(ds, "ImagePositionPatient", 3, f"{where}: {_image_name(p, ds)}")
                    for p, ds in ref.files])
    d = ipp @ normal
    order = np.argsort(d, kind="stable")
    d, ipp = d[order], ipp[order]
    n = len(d)
    dx = float(min(ps[0]))
    sbs = _positive(ref.files[0][1], "SpacingBetweenSlices")
    if n == 1:
        t = known[0] if known else sbs
        if t is None:
            raise Slice2VolError(f"{where}: one image without SliceThickness or SpacingBetweenSlices; its slice "
                                 f"thickness is unknown")
        step_vec, spacing = normal * t, t
    else:
        gaps = np.diff(d)
        names = [_image_name(*ref.files[i]) for i in order]
        if gaps.min() < max(1e-3, POSITION_TOL * dx):
            k = int(np.argmin(gaps))
            raise Slice2VolError(f"{where}: {names[k]} and {names[k + 1]} lie at the same position (several echoes, "
                                 f"repetitions or acquisitions in one series?); a stack needs one image per slice")
        spacing = float((d[-1] - d[0]) / (n - 1))
        tol = max(1e-4, POSITION_TOL * min(dx, float(np.median(gaps))))
        if np.abs(gaps - np.median(gaps)).max() > tol:
            med = float(np.median(gaps))
            k = int(np.argmax(np.abs(gaps - med)))
            if gaps[k] > 1.5 * med:
                missing = int(round(gaps[k] / med)) - 1
                raise Slice2VolError(f"{where}: missing slices: a gap of {gaps[k]:.3g} mm between {names[k]} and "
                                     f"{names[k + 1]} where the slices are {med:.3g} mm apart (about {max(missing, 1)} "
                                     f"image{'s' if missing > 1 else ''} missing)")
            raise Slice2VolError(f"{where}: uneven slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm between "
                                 f"neighbouring images); a stack needs equally spaced slices")
        step_vec = (ipp[-1] - ipp[0]) / (n - 1)
        sin = np.linalg.norm(step_vec - (step_vec @ normal) * normal) / np.linalg.norm(step_vec)
        if sin > SHEAR_TOL:
            angle = float(np.degrees(np.arcsin(min(sin, 1.0))))
            raise Slice2VolError(f"{where}: slices are not stacked along their normal (the slice positions step "
                                 f"{angle:.1f} deg off the normal: gantry tilt or a sheared series); resample it to "
                                 f"an orthogonal grid first")
        fit = ipp[0] + np.arange(n)[:, None] * step_vec
        err = float(np.linalg.norm(ipp - fit, axis=1).max())
        if err > max(1e-3, POSITION_TOL * min(dx, spacing)):
            raise Slice2VolError(f"{where}: slice positions are not on one line ({err:.3g} mm off); a stack "
                                 f"needs equally spaced parallel slices")
    A = np.eye(4)
    A[:3, 0] = row_cos * ps[0][1]  # along a row: column index i, spaced PixelSpacing[1]
    A[:3, 1] = col_cos * ps[0][0]  # down a column: row index j, spaced PixelSpacing[0]
    A[:3, 2] = step_vec
    A[:3, 3] = ipp[0]
    if n > 1 and sbs is not None and abs(sbs - abs(spacing)) > max(1e-3, POSITION_TOL * abs(spacing)):
        # SpacingBetweenSlices is by definition the centre-to-centre step the positions give; writers that
        # disagree exist (SimpleITK / GDCM writing 2D slices put 1; some vendors wrote the gap between slices)
        log.warning("%s: SpacingBetweenSlices %g mm disagrees with the slice positions (%.4g mm apart); the "
                    "positions are used%s", where, sbs, abs(spacing),
                    "" if known else ", and as the slice thickness (no SliceThickness; "
                    "give --thickness if the slices are thinner or thicker than their spacing)")
    if known:
        return order, A, float(spacing), known[0], "SliceThickness"
    if n == 1:
        return order, A, float(spacing), float(sbs), "SpacingBetweenSlices"
    return order, A, float(spacing), abs(float(spacing)), "slice positions"


def read_series(ref: SeriesRef, what: str = "stack") -> DicomSeries:
    """Read one series as a stack, checking it (see the module docstring for what is refused)."""
    from pydicom.pixels import apply_modality_lut

    pydicom = _pydicom()
    where = f"{what} {ref.folder} ({ref.label()})"
    _check_series_headers(ref, where)
    order, A_lps, spacing, th, src = _geometry(ref, where)
    first = ref.files[0][1]
    rows, cols = int(first.Rows), int(first.Columns)
    budget.check_image_size((cols, rows, len(order)), 4, where)
    data = np.empty((cols, rows, len(order)), dtype=np.float32)
    files = []
    multi: dict[Path, np.ndarray] = {}  # an enhanced file's frames, decoded once
    for k, idx in enumerate(order):
        p, head = ref.files[idx]
        frame = getattr(head, "frame_index", None)
        ds = None
        try:
            if frame is None:
                ds = pydicom.dcmread(p)
                values = apply_modality_lut(ds.pixel_array, ds)
            else:
                if p not in multi:
                    ds = pydicom.dcmread(p)
                    multi[p] = ds.pixel_array.reshape(-1, rows, cols)
                # the frame's own rescale (its functional groups; `head` holds them as classic tags)
                values = apply_modality_lut(multi[p][frame], head)
        except Exception as exc:  # compressed without a decoder, truncated pixel data, ...
            raise Slice2VolError(_pixel_error(where, p, ds, exc)) from None
        if values.shape != (rows, cols):
            raise Slice2VolError(f"{where}: {_image_name(p, head)} holds pixel data of shape {values.shape}, not "
                                 f"{rows} x {cols}")
        data[:, :, k] = np.asarray(values, dtype=np.float64).T
        files.append(p)
    affine = LPS_TO_RAS @ A_lps
    check_affine(affine, where)
    meta = _meta(first)
    num = meta.get("SeriesNumber")
    name = _safe_name(f"{ref.description or 'series'}_s{num}" if num is not None else (ref.description or "series"))
    acq_order, acq_source = dicom_order([ref.files[i][1] for i in order], where)
    return DicomSeries(data=data, affine=affine, thickness=float(th), thickness_source=src,
                       slice_spacing=abs(float(spacing)), name=name or "series", meta=meta, files=files,
                       order=acq_order, order_source=acq_source)


def read_dicom_folder(folder: PathLike, series_description: Sequence[str] | str | None = None,
                      what: str = "stack") -> list[DicomSeries]:
    """Every picked series of ``folder`` (see :func:`find_series`), read and checked."""
    return [read_series(ref, what) for ref in find_series(folder, series_description, what)]


# ------------------------------------------------------------------------------------ writing


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it (paths made absolute, links resolved)."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or b in a.parents


def check_output_folder(folder: PathLike, protect: Sequence[PathLike] = (), what: str = "--output-dicom") -> Path:
    """Raise unless ``folder`` may receive a new series: not a file, absent or empty, and neither an
    input nor inside one nor holding one (a series written into an input folder would be read with
    it next time)."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise Slice2VolError(f"{what} {out}: exists and is not a folder")
    for p in protect:
        if _inside(out, Path(p)) or _inside(Path(p), out):
            raise Slice2VolError(f"{what} {out}: would be written {'into' if _inside(out, Path(p)) else 'around'} "
                                 f"the input {p}")
    if out.is_dir() and any(out.iterdir()):
        raise Slice2VolError(f"{what} {out}: folder exists and is not empty; give a new folder for the series")
    return out


def _ds_number(x: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(x) + 0.0)  # + 0.0: no "-0"


def _reorient_for_display(data: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip voxel axes (world positions unchanged) so that columns run towards the patient's left
    / posterior / head as their main direction and rows likewise, as viewers expect
    (an axis-aligned RAS grid becomes the usual axial ``1\\0\\0\\0\\1\\0`` images, feet to head)."""
    for axis in (0, 1):
        c = A[:3, axis]
        if c[np.argmax(np.abs(c))] < 0:
            data = np.flip(data, axis)
            F = np.eye(4)
            F[axis, axis] = -1
            F[axis, 3] = data.shape[axis] - 1
            A = A @ F
    normal = np.cross(A[:3, 0], A[:3, 1])
    if A[:3, 2] @ normal < 0:
        data = np.flip(data, 2)
        F = np.eye(4)
        F[2, 2] = -1
        F[2, 3] = data.shape[2] - 1
        A = A @ F
    return data, A


def _quantise(data: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """``(stored, slope, signed)``: uint16 (int16 if any value is negative) with ``data ~ stored * slope``."""
    vmax = float(np.abs(data).max()) if data.size else 0.0
    signed = bool(data.size and data.min() < 0)
    top = 32767 if signed else 65535
    slope = vmax / top if vmax > 0 else 1.0
    stored = np.clip(np.rint(data / slope), -top if signed else 0, top)
    return stored.astype(np.int16 if signed else np.uint16), slope, signed


def write_series(
    data: np.ndarray,
    affine: np.ndarray,
    folder: PathLike,
    *,
    description: str,
    series_number: int | None = None,
    source: dict | None = None,
    derived: bool = True,
    reorient: bool = True,
    thickness: float | None = None,
    comment: str = "",
    protect: Sequence[PathLike] = (),
) -> Path:
    """Write a 3D image as a classic MR series, one file per slice ``k`` (``IM00001.dcm``, ...).

    Args:
        data: ``(Ni, Nj, Nk)`` intensities (float; finite).
        affine: ``(4, 4)`` voxel-to-world (mm, RAS), shear-free.
        folder: the series folder (absent or empty), written atomically.
        description: ``SeriesDescription``.
        series_number: ``SeriesNumber`` (default: the source's + 1000, else 1000).
        source: :data:`SOURCE_TAGS` of the input series (e.g. ``DicomSeries.meta``): patient, study
            and frame of reference are carried over; ``None`` gives anonymous defaults and new UIDs.
        derived: ``ImageType DERIVED\\SECONDARY\\OTHER`` (a reconstruction) or ``ORIGINAL\\PRIMARY\\OTHER``.
        reorient: flip voxel axes for the usual display (world positions unchanged); ``False``
            writes voxel ``(i, j, k)`` as column ``i``, row ``j`` of image ``k``.
        thickness: ``SliceThickness`` mm (default: the slice spacing).
        comment: ``DerivationDescription`` of a derived series.
        protect: inputs the folder may not be, lie in or hold.
    Returns:
        the folder.
    """
    pydicom = _pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    out = check_output_folder(folder, protect)
    data = np.asarray(data)
    A = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"write_series: a 3D array is needed, got shape {data.shape}")
    check_affine(A, f"DICOM output {out}")
    if not np.all(np.isfinite(data)):
        raise Slice2VolError(f"DICOM output {out}: the image holds NaN or Inf values")
    lps = LPS_TO_RAS @ A  # its own inverse
    if reorient:
        data, lps = _reorient_for_display(data, lps)
    stored, slope, signed = _quantise(np.asarray(data, dtype=np.float64))
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    normal = np.cross(row_cos, col_cos)
    src = dict(source or {})
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    study_uid = src.get("StudyInstanceUID") or generate_uid()
    series_uid = generate_uid()
    frame_uid = src.get("FrameOfReferenceUID") or generate_uid()
    if series_number is None:
        series_number = int(src.get("SeriesNumber", 0)) + 1000 if str(src.get("SeriesNumber", "")).isdigit() else 1000
    positive = stored[stored > 0] if not signed else stored.ravel()
    lo, hi = (np.percentile(positive, [1, 99.5]) * slope) if positive.size else (0.0, 1.0)
    from slice2vol import __version__

    def common() -> Dataset:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: patient names as the source decoded them
        # value 3 is required for MR images; OTHER: no defined term names a reconstruction
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"] if derived else ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MR_IMAGE_STORAGE
        # patient (type 2: present, may be empty)
        ds.PatientName = src.get("PatientName", "Anonymous^")
        ds.PatientID = src.get("PatientID", "SLICE2VOL-" + study_uid.rsplit(".", 1)[-1][-8:])
        ds.PatientBirthDate = src.get("PatientBirthDate", "")
        ds.PatientSex = src.get("PatientSex", "")
        for key in ("PatientAge", "PatientWeight", "StudyDescription", "InstitutionName"):
            if src.get(key):
                setattr(ds, key, src[key])
        # study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = src.get("StudyDate", date)
        ds.StudyTime = src.get("StudyTime", time)
        ds.StudyID = src.get("StudyID", "1")
        ds.AccessionNumber = src.get("AccessionNumber", "")
        ds.ReferringPhysicianName = src.get("ReferringPhysicianName", "")
        # series and equipment
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(series_number)
        ds.SeriesDescription = description[:64]
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.PatientPosition = src.get("PatientPosition", "")
        ds.Manufacturer = "slice2vol"
        ds.SoftwareVersions = f"slice2vol {__version__}"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        if derived:
            ds.DerivationDescription = (comment or "slice-to-volume reconstruction (slice2vol)")[:1024]
        # MR image module: type 1 from the source or 'research mode'; type 2 carried over or empty
        ds.ScanningSequence = src.get("ScanningSequence", "RM").split("\\")
        ds.SequenceVariant = src.get("SequenceVariant", "NONE").split("\\")
        ds.ScanOptions = src.get("ScanOptions", "")
        ds.MRAcquisitionType = src.get("MRAcquisitionType", "")
        for key in ("RepetitionTime", "EchoTime", "EchoTrainLength"):
            setattr(ds, key, src.get(key, ""))
        if src.get("MagneticFieldStrength"):
            ds.MagneticFieldStrength = src["MagneticFieldStrength"]
        ds.ContentDate, ds.ContentTime = date, time
        ds.BurnedInAnnotation = "NO"
        ds.ImageLaterality = "U"  # unpaired (a brain): series Laterality is then not needed
        # image plane
        ds.PixelSpacing = [_ds_number(spacing[1]), _ds_number(spacing[0])]  # row spacing (j), column spacing (i)
        ds.ImageOrientationPatient = [_ds_number(v) for v in (*row_cos, *col_cos)]
        ds.SliceThickness = _ds_number(thickness if thickness is not None else spacing[2])
        ds.SpacingBetweenSlices = _ds_number(spacing[2])
        # pixel values: one slope for the whole series so every image shows on one scale
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = _ds_number(slope)
        ds.RescaleType = "US"
        ds.WindowCenter = _ds_number((lo + hi) / 2)
        ds.WindowWidth = _ds_number(max(hi - lo, slope))
        return ds

    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        for k in range(stored.shape[2]):
            ds = common()
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            pos = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
            ds.ImagePositionPatient = [_ds_number(v) for v in pos]
            ds.SliceLocation = _ds_number(pos @ normal)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.file_meta = meta
            ds.set_pixel_data(np.ascontiguousarray(stored[:, :, k].T), photometric_interpretation="MONOCHROME2",
                              bits_stored=16, generate_instance_uid=False)
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes an owner-only folder
        if out.is_dir():
            out.rmdir()  # empty (checked): the rename below must not nest the series inside it
        os.replace(tmp, out)
        tmp = None
    except BaseException as exc:  # Ctrl-C and SIGTERM too: no half-written series is left
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise Slice2VolError(f"cannot write DICOM series {out}: {exc.strerror or _one_line(exc)}") from None
        raise
    with contextlib.suppress(Exception):
        log.debug("wrote %d DICOM images into %s (%s)", stored.shape[2], out, pydicom.__version__)
    return out
