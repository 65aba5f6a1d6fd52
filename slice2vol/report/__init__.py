"""Visual report of a reconstruction: one self-contained HTML page with PNG figures.

What a researcher checks after a slice-to-volume reconstruction, on one page that opens offline
(relative image paths, no scripts, no external style sheets or fonts):

* the result in three orthogonal planes;
* slice consistency: acquired slices against the same slices simulated from the result, before
  (motion-blind PSF average at the header poses) and after, overall, per stack and per slice;
* for every stack, a few representative slices, acquired / simulated / difference, and a
  through-plane cut of the stack in its own voxel grid (motion shows as jagged edges there);
* the estimated motion of every slice relative to the pose its stack's header gives it:
  rotation angle (deg) and translation (mm) along the slice's own axes u, v (in plane) and
  w (through plane), against acquisition order (where known) or slice index;
* robust outlier weights per slice, excluded slices (weight < 0.5) and their per-slice NCC.

Two entry points share one renderer (:func:`render_report`) through :class:`ReportData`:

* :func:`write_report` from the objects of a run in memory (``reconstruct --report DIR``);
* :func:`report_from_dir` from a folder on disk (``slice2vol report RECON_DIR``).  A report folder
  holds ``report_arrays.npz``: every array the page shows (preprocessed acquired slices, simulated
  slices, pixel masks, poses, weights, the volume) exactly as the run computed them, so the page
  is rebuilt from what the run recorded and nothing is recomputed (no bias-field correction, no
  normalisation, no simulation).  A folder with only the ``--output-transforms`` JSON (no report
  written by the run) is rebuilt by reloading the stacks with the recorded intensity factors and
  simulating them from the output volume at the recorded poses and scales (or reading the
  ``--output-simulated`` files); that is refused when the run corrected the bias field or did not
  record its factors, since the run's slices could then only be recomputed differently.

Figures are drawn with matplotlib's object API (no pyplot state, Agg canvas) and written
atomically; the HTML page is written last.
"""
from __future__ import annotations

from slice2vol.report.data import (
    REPORT_ARRAYS,
    REPORT_DATA,
    REPORT_HTML,
    ReportData,
    StackReport,
    load_report_arrays,
    report_data,
    report_record,
    save_report_arrays,
    slice_motion,
)
from slice2vol.report.folder import report_command, report_data_from_dir, report_from_dir
from slice2vol.report.page import render_report, write_report

__all__ = [
    "REPORT_HTML",
    "REPORT_DATA",
    "REPORT_ARRAYS",
    "save_report_arrays",
    "load_report_arrays",
    "report_data_from_dir",
    "StackReport",
    "ReportData",
    "slice_motion",
    "report_record",
    "report_data",
    "render_report",
    "write_report",
    "report_from_dir",
    "report_command",
]
