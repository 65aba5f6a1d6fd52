"""The HTML page: figures saved atomically beside it, the page written last."""
from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from slice2vol import io
from slice2vol.core.image import Volume
from slice2vol.errors import Slice2VolError

log = logging.getLogger("slice2vol.report")
from slice2vol.report.data import (
    EXCLUDED_BELOW,
    REPORT_ARRAYS,
    REPORT_DATA,
    REPORT_HTML,
    ReportData,
    _e,
    _record_info,
    report_data,
    save_report_arrays,
    slice_motion,
)
from slice2vol.report.figures import (
    fig_consistency,
    fig_outliers,
    fig_stack_motion,
    fig_stack_reslice,
    fig_stack_slices,
    fig_views,
)

# ----------------------------------------------------------------------------- page


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1300px; padding: 0 1.2em 3em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
h3 { margin-bottom: 0.3em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f2f2f2; }
img { max-width: 100%; height: auto; display: block; margin: 0.4em 0; border: 1px solid #eee; }
nav a { margin-right: 1em; } .bad { color: #d62728; } .note { color: #555; font-size: 0.9em; }
figcaption { color: #555; font-size: 0.9em; margin-bottom: 1em; }
"""




def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None or not np.isfinite(v) else format(v, spec)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence]) -> str:
    """An HTML table; header cells are escaped, row cells are HTML already."""
    h = "" if header is None else "<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{h}<tbody>{body}</tbody></table>"


def _img(name: str, alt: str, caption: str, size: tuple[int, int]) -> str:
    return (f'<figure><img src="{_e(name)}" alt="{_e(alt)}" width="{size[0]}" height="{size[1]}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _consistency_rows(data: ReportData) -> list[list[str]]:
    def cells(b, a):
        b, a = b or {}, a or {}
        out = []
        for k, spec in (("ssim", ".3f"), ("psnr", ".2f"), ("ncc", ".3f")):
            out.append(f"{_fmt(b.get(k), spec)} &rarr; {_fmt(a.get(k), spec)}")
        return out

    rows = [["<b>all slices</b>"] + cells(data.before, data.after)]
    for s, st in enumerate(data.stacks):
        rows.append([f"{s}: {_e(st.name)}"] + cells(st.before, st.after))
    return rows


def _stack_rows(data: ReportData) -> list[list[str]]:
    rows = []
    for s, st in enumerate(data.stacks):
        ang, t = slice_motion(st.header_poses, st.poses)
        ok = st.has_pixels
        tn = np.linalg.norm(t, axis=1)
        ex = [int(k) for k in st.index[st.excluded]]
        ex_txt = f"{len(ex)} (k = {', '.join(map(str, ex))})" if ex else "0"
        ncc = st.ncc_after[ok & np.isfinite(st.ncc_after)]
        rows.append([
            f"{s}: {_e(st.name)}" + (" (template)" if data.template == s else ""),
            f"{st.mask.shape[1]} x {st.mask.shape[2]} x {st.mask.shape[0]}",
            f"{st.spacing[0]:g} x {st.spacing[1]:g} / {st.thickness:g}",
            str(int(ok.sum())),
            f'<span class="{"bad" if ex else ""}">{_e(ex_txt)}</span>',
            _fmt(float(np.median(ang[ok])) if ok.any() else None, ".1f") + " / " + _fmt(float(ang[ok].max()) if ok.any() else None, ".1f"),
            _fmt(float(np.median(tn[ok])) if ok.any() else None, ".1f") + " / " + _fmt(float(tn[ok].max()) if ok.any() else None, ".1f"),
            _fmt(float(np.median(ncc)) if ncc.size else None),
        ])
    return rows


def _save(fig, path: Path, protect) -> tuple[int, int]:
    """Save a figure as PNG atomically; returns its size in pixels."""
    w, h = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor="white")

    io.atomic_write(path, write, protect)
    try:  # the constrained layout may adjust the canvas; read back the real size
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # pragma: no cover - PIL is a matplotlib dependency
        pass
    return w, h


def render_report(data: ReportData, out_dir, record: dict | None = None, protect: Sequence = ()) -> Path:
    """Draw every figure of ``data`` into ``out_dir`` and write the HTML page last.

    Returns the page's path (``out_dir/index.html``).  ``record`` is saved as ``report_data.json``.
    """
    out = Path(out_dir)
    protect = list(protect) + list(data.inputs)
    if out.exists() and not out.is_dir():
        raise Slice2VolError(f"report folder {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Slice2VolError(f"cannot create the report folder {out}: {exc.strerror or exc}") from None
    if record is not None:
        io.write_json(record, out / REPORT_DATA, protect=protect)
    save_report_arrays(data, out / REPORT_ARRAYS, protect)
    sizes: dict[str, tuple[int, int]] = {}

    def save(fig, name):
        sizes[name] = _save(fig, out / name, protect)

    save(fig_views(data), "views.png")
    save(fig_consistency(data), "consistency.png")
    save(fig_outliers(data), "outliers.png")
    for s, st in enumerate(data.stacks):
        save(fig_stack_slices(st), f"stack{s}_slices.png")
        save(fig_stack_reslice(st), f"stack{s}_reslice.png")
        save(fig_stack_motion(st), f"stack{s}_motion.png")
    page = _html(data, sizes, record is not None, quality=(record or {}).get("quality"),
                 signal_loss=(record or {}).get("signal_loss"), noise=(record or {}).get("noise"),
                 turns=(record or {}).get("turns"))
    path = out / REPORT_HTML
    io.atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"), protect)
    return path


QUALITY_COLOURS = {"ok": "#2ca02c", "doubtful": "#ff7f0e", "failed": "#d62728"}


def _quality_banner(quality: dict | None) -> str:
    """The verdict of :mod:`slice2vol.evaluation.quality` (the record's ``quality`` object), coloured, with its
    reasons; empty for records written before it existed."""
    if not isinstance(quality, dict) or quality.get("verdict") not in QUALITY_COLOURS:
        return ""
    v = quality["verdict"]
    score = quality.get("score")
    s = f" (score {float(score):.2f})" if isinstance(score, (int, float)) else ""
    reasons = "".join(f"<li>{_e(r)}</li>" for r in quality.get("reasons") or [])
    return (f'<div id="quality" class="quality" style="border-left: 0.5em solid {QUALITY_COLOURS[v]}">'
            f'<b>Quality: <span style="color: {QUALITY_COLOURS[v]}">{_e(v)}</span></b>{_e(s)} '
            f'<span class="note">reference-free verdict from slice consistency, rejected slices, agreement '
            f'between stacks and slice motion</span>' + (f"<ul>{reasons}</ul>" if reasons else "") + "</div>")


def _signal_loss_cell(record: dict | None) -> str | None:
    """The summary's line on pixels left out as signal loss (the record's ``signal_loss``,
    :func:`slice2vol.core.preprocess.prepare`); ``None`` for records written before it existed."""
    if not isinstance(record, dict) or "applied" not in record:
        return None
    if not record["applied"]:
        return f"not checked ({_e(str(record.get('why', '')))})"
    hit = [st for st in record.get("stacks", []) if st.get("pixels")]
    if not hit:
        return "none found"
    n = sum(int(st["pixels"]) for st in hit)
    k = sum(len(st.get("slices", [])) for st in hit)
    where = "; ".join(f"{_e(str(st['name']))}: slices {', '.join(map(str, st.get('slices', [])))}" for st in hit)
    return f'<span class="bad">{n} pixels in {k} slices</span> left out ({where})'


def _noise_cell(record: dict | None) -> str | None:
    """The summary's line on the stacks' noise and the regularisation and edge threshold it set (the
    record's ``noise``, :func:`slice2vol.core.preprocess.prepare`); ``None`` for records written
    before it existed."""
    if not isinstance(record, dict) or not isinstance(record.get("per_stack"), list):
        return None
    try:  # a hand-edited record must not break the page: no line rather than a traceback
        per = ", ".join("n/a" if v is None else f"{100 * float(v):.1f} %" for v in record["per_stack"])
        med = record.get("median")
        text = f"{100 * float(med):.1f} % of the mean brain intensity (per stack: {per})" if med is not None else \
            f"not estimated (per stack: {per})"
        lam = record.get("regularisation")
        if isinstance(lam, (int, float)):
            text += f"; regularisation {float(lam):.3g}"
        edge = record.get("edge_threshold")
        if isinstance(edge, (int, float)):
            text += f"; edge threshold {float(edge):.3g}" + ("" if record.get("white", True) else
                                                             " (noise not white: the default)")
    except (TypeError, ValueError):
        return None
    return text


def _turns_cell(turns) -> str | None:
    """The summary's line on turns of the fetus found during a stack (the record's ``turns``,
    :func:`slice2vol.cli.commands.turns_record`); ``None`` for records written before it existed."""
    if not isinstance(turns, list):
        return None
    try:  # a hand-edited record must not break the page
        if not turns:
            return "none found"
        return "; ".join(f"{_e(str(t['name']))}: about {float(t['angle_deg']):.0f} deg" for t in turns) + \
            " (slices searched on both sides of the turn)"
    except (TypeError, ValueError, KeyError):
        return None


def _html(data: ReportData, sizes: dict, with_record: bool, quality: dict | None = None,
          signal_loss: dict | None = None, noise: dict | None = None, turns: list | None = None) -> str:
    n_sl = sum(int(st.has_pixels.sum()) for st in data.stacks)
    n_ex = sum(int(st.excluded.sum()) for st in data.stacks)
    vs = np.linalg.norm(np.asarray(data.affine)[:3, :3], axis=0)
    n_all = sum(len(st.index) for st in data.stacks)
    info = [("stacks", str(len(data.stacks))), ("slices with pixels", f"{n_sl} (of {n_all} in the stacks)"),
            ("excluded slices (weight &lt; 0.5)", f'<span class="{"bad" if n_ex else ""}">{n_ex}</span>'),
            ("output grid", f"{' x '.join(map(str, data.volume.shape))} voxels of "
                            f"{' x '.join(f'{v:.2f}' for v in vs)} mm")]
    if data.template is not None:
        info.append(("template stack", f"{data.template}: {_e(data.stacks[data.template].name)}"))
    lost = _signal_loss_cell(signal_loss)
    if lost is not None:
        info.append(("dark pixels (signal loss)", lost))
    noise_text = _noise_cell(noise)
    if noise_text is not None:
        info.append(("noise (estimated)", noise_text))
    turns_text = _turns_cell(turns)
    if turns_text is not None:
        info.append(("turns of the fetus during a stack", turns_text))
    info += [(_e(k), v) for k, v in data.info]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    P = []
    P.append(f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{_e(data.title)}</title><style>{_CSS}</style></head><body>")
    P.append(f"<h1>{_e(data.title)}</h1><p class=\"sub\">slice2vol report, written {when}</p>")
    P.append(_quality_banner(quality))
    P.append('<nav><a href="#summary">Summary</a><a href="#volume">Reconstruction</a>'
             '<a href="#consistency">Slice consistency</a><a href="#slices">Acquired vs simulated</a>'
             '<a href="#motion">Motion</a><a href="#outliers">Outliers</a></nav>')
    P.append('<section id="summary"><h2>Summary</h2>')
    P.append(_table(None, [[k, v] for k, v in info]))
    P.append(_table(["stack", "size (H x W x slices)", "pixel / thickness (mm)", "slices with pixels",
                     "excluded slices", "rotation median / max (deg)", "translation median / max (mm)",
                     "median NCC after"], _stack_rows(data)))
    for note in data.notes:
        P.append(f'<p class="note">{_e(note)}</p>')
    if with_record:
        P.append(f'<p class="note">Poses, weights and paths of this run: <a href="{REPORT_DATA}">{REPORT_DATA}</a>; '
                 f"rebuild this page with <code>slice2vol report &lt;this folder&gt;</code>.</p>")
    P.append("</section>")
    P.append('<section id="volume"><h2>Reconstruction</h2>')
    P.append(_img("views.png", "three orthogonal views of the reconstruction",
                  "Axial, coronal and sagittal planes through the centre of the reconstructed region, world "
                  "coordinates (RAS, mm); grey levels: 1st to 99th percentile inside the region.", sizes["views.png"]))
    P.append("</section>")
    P.append('<section id="consistency"><h2>Slice consistency</h2>')
    P.append("<p>Acquired slices against the same slices simulated from a volume through the acquisition model "
             "(slice scales applied). <b>Before</b>: motion-blind PSF average of the slices at their header poses; "
             "<b>after</b>: the reconstruction at the estimated poses. Higher is better.</p>")
    P.append(_table(["", "SSIM before \u2192 after", "PSNR (dB) before \u2192 after", "NCC before \u2192 after"],
                    _consistency_rows(data)))
    P.append(_img("consistency.png", "slice consistency before and after", "Per stack (left, middle) and per "
                  "slice (right).", sizes["consistency.png"]))
    P.append("</section>")
    P.append('<section id="slices"><h2>Acquired vs simulated slices</h2>')
    P.append("<p>For each stack, representative slices (spread over the stack, plus the largest excluded and the "
             "worst-NCC slice): acquired, simulated from the result at the estimated pose, and their difference; "
             "only the pixels used by the reconstruction are shown. Grey levels: 1st to 99th percentile of the "
             "stack's acquired pixels, the same for both rows.</p>")
    for s, st in enumerate(data.stacks):
        P.append(f'<h3 id="stack{s}">Stack {s}: {_e(st.name)}</h3>')
        P.append(_img(f"stack{s}_slices.png", f"acquired and simulated slices of {st.name}",
                      "Titles: slice index k, per-slice NCC after, slice weight w (red: excluded).",
                      sizes[f"stack{s}_slices.png"]))
        P.append(_img(f"stack{s}_reslice.png", f"through-plane view of {st.name}",
                      "Through-plane cuts across all slices, in slice-index order.", sizes[f"stack{s}_reslice.png"]))
    P.append("</section>")
    P.append('<section id="motion"><h2>Estimated motion</h2>')
    P.append("<p>Each slice's estimated pose relative to the pose its stack header gives it: rotation angle (deg) "
             "and translation of the slice centre along the slice's own axes u, v (in plane) and w (through plane), "
             "in mm. The stack-to-template alignment appears as a common offset of all slices of a stack.</p>")
    for s, st in enumerate(data.stacks):
        P.append(_img(f"stack{s}_motion.png", f"estimated motion of {st.name}", f"Stack {s}: {_e(st.name)}.",
                      sizes[f"stack{s}_motion.png"]))
    P.append("</section>")
    P.append('<section id="outliers"><h2>Outlier weights and excluded slices</h2>')
    P.append(f"<p>Robust slice weights (slices with weight below {EXCLUDED_BELOW} are excluded, in red) with the mean "
             "robust pixel weight where known, and the per-slice NCC of acquired against simulated slices.</p>")
    P.append(_img("outliers.png", "slice weights and per-slice NCC", "One row per stack.", sizes["outliers.png"]))
    P.append("</section></body></html>\n")
    return "\n".join(P)


def write_report(out_dir, prep, result, volume: Volume | None = None, consistency_before: dict | None = None,
                 consistency_after: dict | None = None, title: str = "slice2vol reconstruction", *,
                 record: dict | None = None, protect: Sequence = ()) -> Path:
    """Write the report of a run in memory into ``out_dir``; returns the HTML page's path.

    ``record`` (the transforms JSON of the run, with :func:`report_record`'s keys) is saved beside
    the page as ``report_data.json`` so that ``slice2vol report out_dir`` can rebuild it.
    """
    data = report_data(prep, result, volume, consistency_before, consistency_after, title)
    data.info = _record_info(record) if record else []
    return render_report(data, out_dir, record=record, protect=protect)
