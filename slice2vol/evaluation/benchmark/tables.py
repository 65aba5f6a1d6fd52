"""Aggregated tables (mean +- sd per method x motion level), CSV and the machine line."""
from __future__ import annotations

import csv
import io as _stdio
import json
import logging
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from slice2vol.evaluation.benchmark.settings import GPU_METRIC, NAIVE, TABLE_METRICS, BenchmarkConfig

log = logging.getLogger("slice2vol")


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
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
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
    from slice2vol import io

    rows = [_flat(r) for r in records]
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="")
    w.writeheader()
    w.writerows(rows)
    io.atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))


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
