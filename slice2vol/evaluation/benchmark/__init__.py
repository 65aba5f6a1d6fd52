"""``slice2vol benchmark``: reconstruction methods on simulated atlas cases with ground truth.

For every atlas x motion level x seed a *case* is simulated once (3 orthogonal stacks, 1 mm
in-plane, ``--thickness`` mm thick, Rician noise) from a CRL 2017 atlas with
:func:`slice2vol.simulation.simulate.simulate_stacks` into ``OUTPUT/cases/ATLAS_MOTION_seedS/`` and shared by
every method.  Each *job* -- a (case, method) pair, plus one ``naive`` job per case -- runs in its
own worker process (``python -m slice2vol.evaluation.benchmark.worker --worker CASE --method NAME``) so that its
peak RSS is its own; it reads the stacks as the CLI would and

* for a method (a name of :data:`slice2vol.methods.run.METHOD_VARIANTS`): reconstructs with
  :func:`slice2vol.methods.run.run_reconstruction` (``have_stack_masks=True``), timed by wall clock
  (preparation + method; not I/O, simulation or evaluation), peak RSS of the worker (``VmHWM``
  reset just before the reconstruction) and on CUDA ``torch.cuda.max_memory_allocated``;
* for ``naive``: the motion-blind PSF-weighted average of the intensity-normalised slices at their
  *header* poses on the same grid (as :func:`slice2vol.evaluation.metrics.naive_consistency` builds it); its
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

from slice2vol.evaluation.benchmark.cases import case_name, ensure_case, simulate_case
from slice2vol.evaluation.benchmark.plots import plot_quality, plot_time
from slice2vol.evaluation.benchmark.readme import replace_between_markers, update_readme
from slice2vol.evaluation.benchmark.runner import (
    Job,
    benchmark_command,
    is_done,
    jobs_of,
    link_case,
    load_records,
    read_result,
    result_path,
    run_benchmark,
    run_worker,
    write_results,
)
from slice2vol.evaluation.benchmark.settings import (
    ATLAS_GROUPS,
    CASE_JSON,
    DEFAULT_ATLASES,
    DEFAULT_MOTION,
    DEFAULT_SEEDS,
    GPU_METRIC,
    GT_MARGIN_VOX,
    NAIVE,
    PLOT_QUALITY,
    PLOT_TIME,
    RESULT_JSON,
    RESULTS_CSV,
    RESULTS_MD,
    SETTINGS_JSON,
    TABLE_METRICS,
    BenchmarkConfig,
    atlas_dir,
    config_from_args,
    default_methods,
    split_list,
)
from slice2vol.evaluation.benchmark.tables import (
    aggregate,
    machine_description,
    markdown_table,
    results_markdown,
    write_csv,
)
from slice2vol.evaluation.benchmark.worker import run_job, worker_main

__all__ = ["BenchmarkConfig", "config_from_args", "run_benchmark", "benchmark_command", "load_records",
           "aggregate", "markdown_table", "write_results", "update_readme", "replace_between_markers",
           "NAIVE", "DEFAULT_ATLASES", "DEFAULT_MOTION", "DEFAULT_SEEDS"]
