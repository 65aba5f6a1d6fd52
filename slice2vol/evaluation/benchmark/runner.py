"""The parent: jobs, their tasks on dask.distributed (:mod:`slice2vol.core.engine`, the engine of
``slice2vol batch`` too), resumption, results files and the command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from slice2vol.core.engine import dask_client
from slice2vol.errors import Slice2VolError
from slice2vol.evaluation.benchmark.cases import case_name, ensure_case
from slice2vol.evaluation.benchmark.plots import plot_quality, plot_time
from slice2vol.evaluation.benchmark.readme import update_readme
from slice2vol.evaluation.benchmark.settings import (
    NAIVE,
    PLOT_QUALITY,
    PLOT_TIME,
    RESULT_JSON,
    RESULTS_CSV,
    RESULTS_MD,
    BenchmarkConfig,
    _check_settings,
    _record_settings,
    config_from_args,
)
from slice2vol.evaluation.benchmark.tables import aggregate, results_markdown, write_csv

log = logging.getLogger("slice2vol")


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
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_done(output: Path, job: Job) -> bool:
    """Whether a job finished successfully before (a failed one is tried again)."""
    r = read_result(result_path(output, job))
    return r is not None and r.get("status") == "ok"


def link_case(cfg: BenchmarkConfig, case: Path) -> None:
    """Make a case simulated elsewhere (``case``, a folder with ``case.json``) a case of ``cfg.output``
    by linking its files into ``cfg.output/cases/<name>``, where :func:`run_worker` looks (the
    benchmark scripts that time one case on several paths or devices)."""
    linked = cfg.output / "cases" / case.name
    linked.mkdir(parents=True, exist_ok=True)
    for f in case.iterdir():
        if f.is_file() and not (linked / f.name).exists():
            (linked / f.name).symlink_to(f.resolve())


def run_worker(cfg: BenchmarkConfig, job: Job, device: str) -> dict:
    """Run one job in a fresh Python process; a failure becomes a ``status: failed`` result."""
    from slice2vol import io

    case_dir = cfg.output / "cases" / job.case
    job_dir = case_dir / job.method
    job_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "slice2vol.evaluation.benchmark.worker", "--worker", str(case_dir), "--method", job.method,
           "--device", device, "--resolution", repr(cfg.resolution)]
    if cfg.iterations is not None:
        cmd += ["--iterations", str(cfg.iterations)]
    env = dict(os.environ)
    # The worker must import this very package, wherever it is run from and however it is installed.
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
    if cfg.threads:
        cmd += ["--threads", str(cfg.threads)]
        # OpenMP/MKL pools outside torch's control (numpy, scipy, SimpleITK) get the same limit.
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    (job_dir / "worker.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    res = read_result(result_path(cfg.output, job)) if proc.returncode == 0 else None
    if res is None or res.get("status") != "ok":
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        res = {"method": job.method, "status": "failed", "device": device,
               "error": lines[-1] if lines else f"worker exit status {proc.returncode}", "returncode": proc.returncode}
    res.update(atlas=job.atlas, motion=job.motion, seed=job.seed, case=job.case, worker_wall_s=wall)
    io.write_json(res, result_path(cfg.output, job))
    return res




# ------------------------------------------------------------------------------------ tasks


def _simulate_task(cfg: BenchmarkConfig, atlas: str, motion: str, seed: int) -> str | None:
    """Simulate one case unless its ``case.json`` exists; returns why it failed, or None.

    A dask task: a failure is returned, not raised, so the case's jobs record it as their reason.
    """
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    try:
        ensure_case(cfg, atlas, motion, seed)
    except Exception as exc:  # one bad case must not stop the others
        log.debug("simulation failed", exc_info=True)
        return f"simulation: {type(exc).__name__}: {exc}"
    return None


def _job_task(cfg: BenchmarkConfig, job: Job, device: str, simulation_error: str | None) -> dict:
    """One (case, method) job, after its case's simulation task (``simulation_error`` is its result)."""
    from slice2vol import io

    if simulation_error is not None:
        err = {"status": "failed", "error": simulation_error, "atlas": job.atlas, "motion": job.motion,
               "seed": job.seed, "case": job.case, "method": job.method}
        io.write_json(err, result_path(cfg.output, job))
        return err
    return run_worker(cfg, job, device)


def _submit(client, cfg: BenchmarkConfig, todo: Sequence[Job], device: str) -> dict:
    """Submit one simulation task per case and one task per job depending on it; returns
    ``{future: job}``.  Each job's task runs :func:`run_worker`, which still starts a fresh Python
    process, so a job's time and peak memory are its own and not the dask worker's."""
    token = uuid.uuid4().hex[:6]
    sims: dict[str, object] = {}
    futures = {}
    for job in todo:
        if job.case not in sims:
            sims[job.case] = client.submit(_simulate_task, cfg, job.atlas, job.motion, job.seed, pure=False,
                                           key=f"simulate-{job.case}-{token}", retries=1)
        fut = client.submit(_job_task, cfg, job, device, sims[job.case], pure=False, retries=1,
                            key=f"job-{job.case}-{job.method}-{token}")
        futures[fut] = job
    return futures


def load_records(output: Path, jobs: Iterable[Job]) -> list[dict]:
    """The stored results of ``jobs`` (missing ones left out), in job order."""
    out = []
    for job in jobs:
        r = read_result(result_path(output, job))
        if r is not None:
            r.update(atlas=job.atlas, motion=job.motion, seed=job.seed, case=job.case, method=job.method)
            out.append(r)
    return out



def write_results(records: Sequence[dict], cfg: BenchmarkConfig) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and the two plots into ``cfg.output``."""
    from slice2vol import io

    out = cfg.output
    write_csv(records, out / RESULTS_CSV)
    text = results_markdown(records, cfg)
    io.atomic_write(out / RESULTS_MD, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    rows = aggregate(records)
    written = [out / RESULTS_CSV, out / RESULTS_MD]
    if any(r["n"] for r in rows):
        plot_quality(rows, out / PLOT_QUALITY)
        plot_time(rows, out / PLOT_TIME)
        written += [out / PLOT_QUALITY, out / PLOT_TIME]
    return written


# ------------------------------------------------------------------------------------ command


def run_benchmark(cfg: BenchmarkConfig) -> int:
    """Run every job not finished before, then write the results; returns the exit status
    (0, or 1 when a job failed)."""
    import torch
    from tqdm import tqdm

    from slice2vol import io
    from slice2vol.core.runtime import resolve_device

    device = str(resolve_device(cfg.device))
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
    t_start = time.perf_counter()
    with dask_client(cfg.scheduler, cfg.workers, cfg.threads, cfg.verbose, cfg.processes,
                     on_gpu=device.startswith("cuda")) as client:
        from dask.distributed import as_completed

        n_workers = len(client.scheduler_info().get("workers", {}))
        print(f"on {n_workers} dask worker(s), {cfg.threads or 'default'} torch thread(s) each; dashboard "
              f"{client.dashboard_link}", flush=True)
        futures = _submit(client, cfg, todo, device)
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="benchmark", unit="job",
                  disable=not cfg.progress, dynamic_ncols=True) as bar:
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # the task's worker died more often than dask retries, or a bug
                    res = {"method": job.method, "status": "failed", "case": job.case,
                           "error": f"task failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
                    io.write_json(res | {"atlas": job.atlas, "motion": job.motion, "seed": job.seed},
                                  result_path(cfg.output, job))
                if res.get("status") != "ok":
                    failed.append(res)
                    bar.write(f"FAILED {job.case} {job.method}: {res.get('error')}")
                elif cfg.progress or log.isEnabledFor(logging.INFO):
                    bar.write(f"{job.case:<24} {job.method:<16} PSNR {res['psnr']:6.2f} dB  SSIM {res['ssim']:.3f}  "
                              f"TRE {res['tre_median_mm']:6.2f} mm  {res['time_s']:7.1f} s  "
                              f"{res['peak_rss_mb']:6.0f} MB")
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
