"""A stack's acquisition order (slice timing) from its files.

Which slice was acquired when decides which slices moved together: the global pose search
registers the slices of one interleave package as a group (:func:`slice2vol.methods.svr.search_groups`),
the quality verdict compares slices acquired one after another, the report plots motion over time.
Files rarely say, so the default assumes an interleaved acquisition with 2 packages (slice ``k``
in package ``k % 2``); where a file does say, the order is read and recorded as
``Stack.order`` (time rank of every slice) with ``Stack.meta["order_source"]``.  Sources, in the
order they are tried:

* **DICOM**: per image ``AcquisitionDateTime`` (an enhanced file's per-frame
  ``FrameAcquisitionDateTime``), else ``AcquisitionDate`` + ``AcquisitionTime``, else
  ``AcquisitionTime``.  ``ContentTime`` (when the image was *made*) and ``InstanceNumber`` are not
  used: scanners number and reconstruct images in order of position as often as in order of time.
* **NIfTI**: the BIDS JSON sidecar's ``SliceTiming`` (seconds from the start of the volume, one
  per slice along the slice axis, as dcm2niix writes it; ``SliceEncodingDirection`` ``k-`` means
  the list runs from the last slice to the first), else the NIfTI header's slice timing
  (``slice_code``, ``slice_duration`` and the slice dimension in ``dim_info``, through nibabel).

The order is left unknown (with one log line saying why) when a time is missing, when two
slices share a time (one time stamp for the whole series, or a simultaneous-multislice
acquisition, whose packages the ``k % p`` rule does not describe either), or when the number
of times differs from the number of slices.  Only the order matters, never the times' values.
"""
from __future__ import annotations

import datetime
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["order_from_times", "dicom_seconds", "dicom_order", "sidecar_order", "header_order"]

log = logging.getLogger(__name__)


def order_from_times(times: Sequence[float] | np.ndarray) -> tuple[np.ndarray | None, str]:
    """``(order, why)``: the time rank ``0..N-1`` of every slice, or ``None`` and the reason.

    >>> order_from_times([0.0, 1.2, 0.4, 1.6, 0.8])[0].tolist()
    [0, 3, 1, 4, 2]
    >>> order_from_times([3.0, 3.0, 4.0])
    (None, 'two slices share one time')
    """
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if t.size == 0:
        return None, "no slice times"
    if not np.all(np.isfinite(t)):
        return None, "a slice time is not a number"
    if np.unique(t).size < t.size:
        return None, "two slices share one time"
    order = np.empty(t.size, dtype=np.int64)
    order[np.argsort(t, kind="stable")] = np.arange(t.size)
    return order, ""


def _tm_seconds(text: str) -> float | None:
    """Seconds after midnight of a DICOM TM (``HHMMSS.FFFFFF``, also the old ``HH:MM:SS.frac``)."""
    s = text.strip().replace(":", "")
    if not s:
        return None
    try:
        whole, _, frac = s.partition(".")
        if not whole.isdigit() or len(whole) not in (2, 4, 6) or (frac and not frac.isdigit()):
            return None
        h, m, sec = int(whole[0:2]), int(whole[2:4] or 0), int(whole[4:6] or 0)
        return h * 3600.0 + m * 60.0 + sec + (float("0." + frac) if frac else 0.0)
    except ValueError:
        return None


def _da_days(text: str) -> int | None:
    """Days since 0001-01-01 of a DICOM DA (``YYYYMMDD``)."""
    s = text.strip()
    if len(s) != 8 or not s.isdigit():
        return None
    try:
        return datetime.date(int(s[:4]), int(s[4:6]), int(s[6:])).toordinal()
    except ValueError:
        return None


def _dt_seconds(text: str) -> float | None:
    """Seconds of a DICOM DT (``YYYYMMDDHHMMSS.FFFFFF&ZZXX``; the UTC offset, if any, is dropped:
    every image of a series carries the same one)."""
    s = text.strip()
    for sign in "+-":
        if sign in s[8:]:
            s = s[: 8 + s[8:].index(sign)]
    if len(s) < 8:
        return None
    days = _da_days(s[:8])
    rest = s[8:]
    secs = _tm_seconds(rest) if rest else 0.0
    if days is None or secs is None:
        return None
    return days * 86400.0 + secs


def dicom_seconds(ds) -> tuple[float | None, str]:
    """``(seconds, tag)``: when one image (or an enhanced file's frame) was acquired, and the tag
    that said so; ``(None, "")`` where none does."""
    for key in ("FrameAcquisitionDateTime", "AcquisitionDateTime"):
        v = ds.get(key)
        if v not in (None, ""):
            t = _dt_seconds(str(v))
            if t is not None:
                return t, key
    v = ds.get("AcquisitionTime")
    if v not in (None, ""):
        t = _tm_seconds(str(v))
        if t is not None:
            d = ds.get("AcquisitionDate")
            days = _da_days(str(d)) if d not in (None, "") else None
            return (t + days * 86400.0, "AcquisitionDate/Time") if days is not None else (t, "AcquisitionTime")
    return None, ""


def dicom_order(headers: Sequence, where: str) -> tuple[np.ndarray | None, str]:
    """``(order, source)`` of a series' images given in slice order (their headers), or
    ``(None, "")``; logs why the order stays unknown."""
    times, tags = [], set()
    for ds in headers:
        t, tag = dicom_seconds(ds)
        if t is None:
            log.info("%s: no acquisition time in every image; acquisition order unknown", where)
            return None, ""
        times.append(t)
        tags.add(tag)
    if len(tags) > 1:  # a mixture would compare times of different kinds
        log.info("%s: acquisition times from different tags (%s); acquisition order unknown", where,
                 ", ".join(sorted(tags)))
        return None, ""
    order, why = order_from_times(times)
    if order is None:
        log.info("%s: acquisition order unknown (%s)", where, why)
        return None, ""
    return order, f"DICOM {tags.pop()}"


def sidecar_order(sidecar: dict, side: Path, n: int) -> tuple[np.ndarray | None, str]:
    """``(order, source)`` from a BIDS sidecar's ``SliceTiming`` for a stack of ``n`` slices along
    voxel axis ``k``, or ``(None, "")`` (a warning says why where the sidecar has it but it cannot
    be used)."""
    st = sidecar.get("SliceTiming")
    if st is None:
        return None, ""
    direction = sidecar.get("SliceEncodingDirection", "k")
    if direction not in ("k", "k-"):
        log.warning("sidecar %s: SliceEncodingDirection %.20r is not the stack's slice axis (k); SliceTiming not used",
                    side, direction)
        return None, ""
    if (not isinstance(st, list) or len(st) != n
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in st)):
        what = f"{len(st)} values" if isinstance(st, list) else type(st).__name__
        log.warning("sidecar %s: SliceTiming (%s) is not one number per slice (%d slices); not used", side, what, n)
        return None, ""
    times = np.asarray(st, dtype=np.float64)
    if direction == "k-":
        times = times[::-1]
    order, why = order_from_times(times)
    if order is None:
        log.info("sidecar %s: SliceTiming gives no acquisition order (%s)", side, why)
        return None, ""
    return order, "SliceTiming"


def header_order(img, n: int) -> tuple[np.ndarray | None, str]:
    """``(order, source)`` from a NIfTI header's slice timing (nibabel ``get_slice_times``) when its
    slice dimension is the stack's axis ``k``, or ``(None, "")``."""
    hdr = getattr(img, "header", None)
    try:
        if hdr is None or hdr.get_dim_info()[2] != 2 or int(hdr["slice_code"]) == 0:
            return None, ""
        times = hdr.get_slice_times()
    except Exception:  # nibabel raises HeaderDataError where the timing fields are incomplete
        return None, ""
    if len(times) != n or any(t is None for t in times):
        return None, ""
    order, _ = order_from_times(times)
    return (order, "NIfTI header slice timing") if order is not None else (None, "")
