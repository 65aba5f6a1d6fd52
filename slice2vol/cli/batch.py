"""``slice2vol batch BIDS_ROOT --output DERIV_DIR``: a cohort on dask.distributed.

One task per subject/session (:func:`slice2vol.cli.bids.discover`), each running exactly what
``slice2vol reconstruct`` runs (the same parser and command, in process), so a batch output is the
same volume a single run gives.  The engine is dask.distributed: without ``--scheduler`` a
``LocalCluster`` of ``--workers`` processes on this machine, with ``--scheduler tcp://HOST:PORT``
a running cluster (for SLURM / PBS start one with dask-jobqueue, see README "Cohorts").

Outputs (BIDS derivatives) under ``DERIV_DIR``:

* ``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy`` slice2vol, version,
  options);
* per job, in ``sub-<label>/[ses-<label>/]anat/``: ``<prefix>_rec-<method>_T2w.nii.gz``, its
  JSON sidecar (inputs with SHA-256 checksums, options, quality verdict, timings, peak memory),
  ``<prefix>_rec-<method>_transforms.json`` and the report folder ``<prefix>_rec-<method>_report/``;
* ``batch_summary.tsv`` (one row per job: status, reason, quality, time, peak RSS) and
  ``index.html`` linking every report.

A job works in a private folder (``DERIV_DIR/.work/``) and moves its files into place only when it
has succeeded, the sidecar last: a job killed half-way leaves nothing in the derivatives, and a
sidecar means a complete job.  A rerun skips every job whose sidecar records the same input
checksums and options (idempotent); a failed job has no sidecar and is tried again.  A job that
fails (bad file, failed reconstruction) fails alone with its one-line reason; the batch exits 1 when
any job failed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import html
import io as _stdio
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from slice2vol import __version__, io
from slice2vol.cli.bids import Subject, discover
from slice2vol.core.engine import dask_client
from slice2vol.errors import Slice2VolError

log = logging.getLogger("slice2vol")

__all__ = ["batch_command", "run_subject", "SUMMARY_TSV"]

SUMMARY_TSV = "batch_summary.tsv"
SUMMARY_COLUMNS = ("subject", "session", "status", "reason", "verdict", "quality_score", "slices_excluded",
                   "slices_with_pixels", "time_s", "peak_rss_mb", "output")
#: reconstruct options a batch sets itself, per job
RESERVED = ("--output", "-o", "--stack-masks", "--mask", "--output-transforms", "--report", "--output-simulated",
            "--template", "--output-gaussians")
#: reconstruct options a batch cannot pass on as they are
UNSUPPORTED = ("--output-dicom",)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reconstruct_args(options: list[str]) -> argparse.Namespace:
    """The reconstruct options of the batch, checked now (one line on a bad one) with a dummy stack."""
    from slice2vol.cli.parser import build_parser

    for opt in options:
        if opt.split("=")[0] in RESERVED:
            raise Slice2VolError(f"batch sets {opt.split('=')[0]} itself for every subject; leave it out")
        if opt.split("=")[0] in UNSUPPORTED:
            raise Slice2VolError(f"{opt.split('=')[0]} is not available in batch yet (every subject would write "
                                 f"into one folder); reconstruct the subject alone for a DICOM series")
    parser = build_parser()
    err = _stdio.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(["reconstruct", "STACK", "-o", "OUT.nii.gz", *options])
    except SystemExit:
        line = (err.getvalue().strip().splitlines() or ["bad reconstruct option"])[-1]
        raise Slice2VolError(f"reconstruct option: {line.split('error: ', 1)[-1]}") from None


def _names(sub: Subject, method: str) -> dict[str, str]:
    base = f"{sub.key}_rec-{method}"
    return {"volume": f"{base}_T2w.nii.gz", "sidecar": f"{base}_T2w.json", "transforms": f"{base}_transforms.json",
            "report": f"{base}_report"}


def _row(sub: Subject, status: str, reason: str = "", **kw) -> dict:
    row = {k: "" for k in SUMMARY_COLUMNS}
    row.update(subject=sub.label, session=sub.session or "", status=status, reason=reason)
    row.update({k: v for k, v in kw.items() if k in row})
    return row


def _f(v, spec: str = ".1f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else ""


def _done_row(sub: Subject, sidecar: dict, out_path: Path, status: str) -> dict:
    q = sidecar.get("quality") or {}
    sl = sidecar.get("slices") or {}
    return _row(sub, status, verdict=q.get("verdict", ""), quality_score=_f(q.get("score"), ".3f"),
                slices_excluded=sl.get("excluded", ""), slices_with_pixels=sl.get("with_pixels", ""),
                time_s=_f((sidecar.get("timings_s") or {}).get("total_s")), peak_rss_mb=_f(sidecar.get("peak_rss_mb"), ".0f"),
                output=str(out_path))


def run_subject(sub: Subject, deriv: str, options: list[str], method: str, threads: int | None = None) -> dict:
    """Reconstruct one subject/session into the derivatives folder ``deriv``; returns its summary row.

    Runs in a dask worker process (and in tests in process).  Never raises for the subject's own
    faults: they become ``status: failed`` with the one-line reason ``reconstruct`` printed.
    """
    import torch

    from slice2vol.cli.parser import main as cli_main
    from slice2vol.core.memory import peak_rss_mb, reset_peak_rss

    if threads:
        torch.set_num_threads(int(threads))
    root = Path(deriv)
    names = _names(sub, method)
    final = root / sub.anat
    if sub.problem:
        return _row(sub, "failed", sub.problem)
    inputs = [{"path": str(p), "sha256": _sha256(p)} for p in [*sub.stacks, *(sub.masks or [])]]
    sidecar_path = final / names["sidecar"]
    if sidecar_path.is_file():
        try:
            old = json.loads(sidecar_path.read_text())
            if old.get("inputs") == inputs and old.get("options") == options and (final / names["volume"]).is_file():
                return _done_row(sub, old, final / names["volume"], "ok (unchanged, not recomputed)")
        except (OSError, ValueError, RecursionError):
            pass  # unreadable sidecar: compute again
    work = root / ".work" / f"{sub.key}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    argv = ["reconstruct", *map(str, sub.stacks), "-o", str(work / names["volume"]),
            "--output-transforms", str(work / names["transforms"]), "--report", str(work / names["report"]),
            "--no-progress"]
    if sub.masks:
        argv += ["--stack-masks", *map(str, sub.masks)]
    if "--thickness" not in options and sub.thickness and all(t is not None for t in sub.thickness):
        argv += ["--thickness", *(f"{t:g}" for t in sub.thickness)]
    argv += options
    err = _stdio.StringIO()
    reset_peak_rss()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_stdio.StringIO()):
            rc = cli_main(argv)
    except Exception as exc:  # a bug, not the subject's data: still this subject's failure alone
        rc, err = 1, _stdio.StringIO(f"slice2vol: internal error: {type(exc).__name__}: {exc}")
    wall = time.perf_counter() - t0
    if rc != 0:
        shutil.rmtree(work, ignore_errors=True)
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        reason = lines[-1].removeprefix("slice2vol: error: ") if lines else f"exit status {rc}"
        return _row(sub, "failed", reason[:300], time_s=f"{wall:.1f}")
    record = json.loads((work / names["transforms"]).read_text())
    sidecar = {"GeneratedBy": [{"Name": "slice2vol", "Version": __version__}],
               "Sources": [str(p) for p in sub.stacks], "inputs": inputs, "options": options, "method": method,
               "quality": record.get("quality"), "slices": record.get("slices"), "timings_s": record.get("timings_s"),
               "wall_s": wall, "peak_rss_mb": peak_rss_mb()}
    # into place: the volume, poses and report first, the sidecar (the "complete" mark) last
    final.mkdir(parents=True, exist_ok=True)
    os.replace(work / names["volume"], final / names["volume"])
    os.replace(work / names["transforms"], final / names["transforms"])
    if (final / names["report"]).exists():
        shutil.rmtree(final / names["report"])
    os.replace(work / names["report"], final / names["report"])
    io.write_json(sidecar, sidecar_path)
    shutil.rmtree(work, ignore_errors=True)
    return _done_row(sub, sidecar, final / names["volume"], "ok")


def _write_summary(root: Path, rows: list[dict]) -> None:
    def tsv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, SUMMARY_COLUMNS, delimiter="\t", lineterminator="\n")
            w.writeheader()
            w.writerows(rows)

    io.atomic_write(root / SUMMARY_TSV, tsv)
    items = []
    for r in rows:
        name = f"sub-{r['subject']}" + (f" ses-{r['session']}" if r["session"] else "")
        if r["status"].startswith("ok") and r["output"]:
            rep = Path(r["output"]).with_name(Path(r["output"]).name.replace("_T2w.nii.gz", "_report")) / "index.html"
            link = os.path.relpath(rep, root)
            items.append(f'<tr><td><a href="{html.escape(link)}">{html.escape(name)}</a></td><td>{html.escape(r["status"])}'
                         f'</td><td>{html.escape(str(r["verdict"]))}</td><td></td></tr>')
        else:
            items.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(r['status'])}</td><td></td>"
                         f"<td>{html.escape(r['reason'])}</td></tr>")
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>slice2vol batch</title></head><body>"
            f"<h1>slice2vol batch ({len(rows)} jobs)</h1><table border=\"1\"><tr><th>job</th><th>status</th>"
            f"<th>quality</th><th>reason</th></tr>{''.join(items)}</table></body></html>\n")
    io.atomic_write(root / "index.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def _clean_up(root: Path, subjects: list[Subject], rows: list[dict], method: str) -> None:
    """After every task has ended: remove what a killed worker left of this batch's jobs (their
    private folders, and outputs of a job whose sidecar was never written), so nothing partial
    remains in the derivatives."""
    work = root / ".work"
    for sub in subjects:
        for d in work.glob(f"{sub.key}-*"):
            shutil.rmtree(d, ignore_errors=True)
    done = {(r["subject"], r["session"]) for r in rows if r["status"].startswith("ok")}
    for sub in subjects:
        if (sub.label, sub.session or "") in done:
            continue
        names, final = _names(sub, method), root / sub.anat
        if not (final / names["sidecar"]).exists():
            for key in ("volume", "transforms"):
                with contextlib.suppress(OSError):
                    (final / names[key]).unlink()
            shutil.rmtree(final / names["report"], ignore_errors=True)
    with contextlib.suppress(OSError):
        work.rmdir()  # only when empty: another batch's job may still be running there


def batch_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    options = list(args.reconstruct_options or [])
    rec = _reconstruct_args(options)
    subjects = discover(args.bids_root, args.participant_label, args.session, args.masks)
    root = Path(args.output)
    if root.resolve() == Path(args.bids_root).resolve():
        raise Slice2VolError("--output must be a derivatives folder, not the BIDS root itself")
    root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise Slice2VolError(f"--output {root}: not writable")
    io.write_json({"Name": "slice2vol reconstructions", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "slice2vol", "Version": __version__,
                                    "CodeURL": "https://github.com/slice2vol/slice2vol"}],
                   "options": options, "method": rec.method}, root / "dataset_description.json")
    rows: list[dict] = []
    import torch

    on_gpu = getattr(rec, "device", "auto") != "cpu" and torch.cuda.is_available()  # the subjects' --device
    with dask_client(args.scheduler, args.workers, args.threads_per_worker, args.verbose, on_gpu=on_gpu) as client:
        print(f"slice2vol batch: {len(subjects)} job(s) on {len(client.scheduler_info().get('workers', {}))} "
              f"dask worker(s); dashboard {client.dashboard_link}", flush=True)
        from dask.distributed import as_completed

        futures = [client.submit(run_subject, s, str(root), options, rec.method, args.threads_per_worker,
                                 key=f"slice2vol-{s.key}-{uuid.uuid4().hex[:6]}", pure=False, retries=1)
                   for s in subjects]
        by_future = dict(zip(futures, subjects))
        bar = tqdm(total=len(futures), desc="subjects", unit="subject", disable=args.no_progress)
        for fut in as_completed(futures):
            sub = by_future[fut]
            try:
                row = fut.result()
            except Exception as exc:  # the worker died more often than dask allows, or a bug
                row = _row(sub, "failed", f"task failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            rows.append(row)
            bar.update(1)
            if not row["status"].startswith("ok"):
                print(f"slice2vol batch: {sub.key} failed: {row['reason']}", file=sys.stderr, flush=True)
        bar.close()
    order = {s.key: i for i, s in enumerate(subjects)}
    rows.sort(key=lambda r: order[f"sub-{r['subject']}" + (f"_ses-{r['session']}" if r["session"] else "")])
    _write_summary(root, rows)
    _clean_up(root, subjects, rows, rec.method)
    n_bad = sum(not r["status"].startswith("ok") for r in rows)
    print(f"slice2vol batch: {len(rows) - n_bad} ok, {n_bad} failed; summary {root / SUMMARY_TSV}")
    return 1 if n_bad else 0
