"""``slice2vol batch``: BIDS discovery, and a tiny cohort on a dask LocalCluster (issue 15)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_checks import refused

from slice2vol.cli.bids import discover
from slice2vol.cli.parser import main
from slice2vol.errors import Slice2VolError
from slice2vol.simulation.simulate import SimulationConfig, save_simulation, simulate_stacks

FAST = ["--method", "svr", "--iterations", "1", "--resolution", "3", "--device", "cpu"]


def _phantom():
    from test_report import _phantom as p

    return p()


def _cohort(root: Path, labels=("01", "02"), sessions=None, corrupt=None, missing_mask=None) -> Path:
    """A BIDS dataset of simulated subjects (3 stacks each, 2 mm pixels, 4 mm slices, mild motion)
    with a mask derivative; ``corrupt``/``missing_mask``: a label whose stack is broken / mask absent."""
    (root / "ds").mkdir(parents=True)
    (root / "ds" / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    vol = _phantom()
    for i, label in enumerate(labels):
        for ses in sessions or [None]:
            cfg = SimulationConfig(n_stacks=3, orientations=("axial", "coronal", "sagittal"), spacing=2.0,
                                   thickness=4.0, motion="mild", noise=0.02, margin=4.0)
            tmp = root / "tmp"
            save_simulation(simulate_stacks(vol, vol.mask, cfg, torch.Generator().manual_seed(i)), tmp)
            rel = Path(f"sub-{label}") / (f"ses-{ses}" if ses else "") / "anat"
            prefix = f"sub-{label}" + (f"_ses-{ses}" if ses else "")
            for k, ori in enumerate(("ax", "cor", "sag")):
                stem = f"{prefix}_acq-{ori}"
                (root / "ds" / rel).mkdir(parents=True, exist_ok=True)
                (root / "masks" / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp / f"stack_{k:02d}.nii.gz", root / "ds" / rel / f"{stem}_T2w.nii.gz")
                (root / "ds" / rel / f"{stem}_T2w.json").write_text(json.dumps({"SliceThickness": 4.0}))
                if not (label == missing_mask and k == 1):
                    shutil.copy(tmp / f"mask_{k:02d}.nii.gz", root / "masks" / rel / f"{stem}_desc-brain_mask.nii.gz")
            shutil.rmtree(tmp)
            if label == corrupt:
                (root / "ds" / rel / f"{prefix}_acq-cor_T2w.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI")
    return root / "ds"


def test_discovery_reads_subjects_sessions_masks_and_thickness(tmp_path):
    ds = _cohort(tmp_path, labels=("01", "02"), sessions=("a", "b"), missing_mask="02")
    subs = discover(ds, masks=tmp_path / "masks")
    assert [s.key for s in subs] == ["sub-01_ses-a", "sub-01_ses-b", "sub-02_ses-a", "sub-02_ses-b"]
    assert [p.name for p in subs[0].stacks] == ["sub-01_ses-a_acq-ax_T2w.nii.gz", "sub-01_ses-a_acq-cor_T2w.nii.gz",
                                                "sub-01_ses-a_acq-sag_T2w.nii.gz"]
    assert [m.name for m in subs[0].masks] == [f"sub-01_ses-a_acq-{o}_desc-brain_mask.nii.gz" for o in ("ax", "cor", "sag")]
    assert subs[0].thickness == [4.0, 4.0, 4.0] and subs[0].problem is None
    assert subs[2].masks is None and "no brain mask" in subs[2].problem
    assert [s.key for s in discover(ds, participants=["sub-02"], sessions=["b"])] == ["sub-02_ses-b"]
    with pytest.raises(Slice2VolError, match="no T2w stacks for sub-07"):
        discover(ds, participants=["07"])
    with pytest.raises(Slice2VolError, match="not a BIDS dataset"):
        discover(tmp_path / "masks")


def test_batch_refuses_options_it_sets_itself(tmp_path, capsys):
    ds = _cohort(tmp_path, labels=("01",))
    refused(["batch", ds, "-o", tmp_path / "d", "--report", tmp_path / "r"], capsys, r"batch sets --report itself")
    refused(["batch", ds, "-o", tmp_path / "d", "--method", "nope"], capsys, r"reconstruct option: .*--method")
    refused(["batch", ds, "-o", tmp_path / "d", "--output-dicom", tmp_path / "x"], capsys,
            r"--output-dicom is not available in batch")
    assert not (tmp_path / "d").exists()


def test_cohort_on_a_local_cluster_isolates_failures_and_resumes(tmp_path, capsys):
    ds = _cohort(tmp_path, labels=("01", "02", "03"), corrupt="02", missing_mask="03")
    out = tmp_path / "deriv"
    argv = ["batch", str(ds), "-o", str(out), "--masks", str(tmp_path / "masks"), "--workers", "1", "--no-progress", *FAST]
    assert main(argv) == 1  # two subjects failed, each alone
    rows = list(csv.DictReader(open(out / "batch_summary.tsv"), delimiter="\t"))
    assert [(r["subject"], r["status"]) for r in rows] == [("01", "ok"), ("02", "failed"), ("03", "failed")]
    assert "not a readable NIfTI" in rows[1]["reason"] and "no brain mask" in rows[2]["reason"]
    anat = out / "sub-01" / "anat"
    vol = anat / "sub-01_rec-svr_T2w.nii.gz"
    side = json.loads((anat / "sub-01_rec-svr_T2w.json").read_text())
    assert side["quality"]["verdict"] in ("ok", "doubtful", "failed") and len(side["inputs"]) == 6
    assert all(len(i["sha256"]) == 64 for i in side["inputs"]) and side["options"] == FAST
    assert (anat / "sub-01_rec-svr_report" / "index.html").is_file()
    assert not (out / "sub-02").exists() and not (out / ".work").exists()
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "slice2vol"
    assert "sub-01_rec-svr_report/index.html" in (out / "index.html").read_text()
    # the same volume as a single reconstruct run with the same options
    d, m = ds / "sub-01" / "anat", tmp_path / "masks" / "sub-01" / "anat"
    single = tmp_path / "single.nii.gz"
    assert main(["reconstruct", *[str(d / f"sub-01_acq-{o}_T2w.nii.gz") for o in ("ax", "cor", "sag")],
                 "--stack-masks", *[str(m / f"sub-01_acq-{o}_desc-brain_mask.nii.gz") for o in ("ax", "cor", "sag")],
                 "--thickness", "4", "-o", str(single), "--no-progress", *FAST]) == 0
    assert np.array_equal(nib.load(single).get_fdata(), nib.load(vol).get_fdata())
    # a rerun recomputes nothing; a changed input is recomputed
    before = vol.stat().st_mtime_ns
    assert main(argv) == 1
    rows = list(csv.DictReader(open(out / "batch_summary.tsv"), delimiter="\t"))
    assert rows[0]["status"] == "ok (unchanged, not recomputed)" and vol.stat().st_mtime_ns == before
    capsys.readouterr()


def test_a_worker_killed_mid_task_loses_no_subject_and_leaves_nothing_partial(tmp_path):
    """SIGKILL of the dask worker running a subject: dask runs the task again on the other worker;
    every subject completes and no partial file or private folder remains."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dask.distributed import Client

    ds = _cohort(tmp_path, labels=("01", "02", "03"))
    out = tmp_path / "deriv"
    sched_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file",
                               str(sched_file), "--no-dashboard", "--port", "0"], stdout=log, stderr=subprocess.STDOUT,
                              env=env)]
    try:
        for _ in range(200):
            if sched_file.is_file():
                break
            time.sleep(0.1)
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                           str(sched_file), "--nthreads", "1", "--no-dashboard"], stdout=log,
                                          stderr=subprocess.STDOUT, env=env))
        client = Client(scheduler_file=str(sched_file), timeout="30s")
        client.wait_for_workers(2, timeout=60)
        address = client.scheduler.address
        batch = subprocess.Popen([sys.executable, "-m", "slice2vol.cli.parser", "batch", str(ds), "-o", str(out),
                                  "--scheduler", address, "--no-progress", *FAST],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        killed = None
        for _ in range(600):  # kill the worker that is running a task, once a job folder exists
            busy = {w: ts for w, ts in client.processing().items() if ts}
            if busy and any((out / ".work").glob("sub-*")):
                victim = next(iter(busy))
                pid = client.run(os.getpid, workers=[victim])[victim]
                os.kill(pid, signal.SIGKILL)
                killed = victim
                break
            time.sleep(0.1)
        text, _ = batch.communicate(timeout=300)
        client.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        log.close()
    assert killed is not None, "no task was seen running"
    assert batch.returncode == 0, text
    rows = list(csv.DictReader(open(out / "batch_summary.tsv"), delimiter="\t"))
    assert [(r["subject"], r["status"]) for r in rows] == [("01", "ok"), ("02", "ok"), ("03", "ok")]
    assert not (out / ".work").exists()
    assert not list(out.rglob(".*.tmp*")) and not [p for p in out.rglob("*") if p.name.startswith(".")]
    for label in ("01", "02", "03"):
        anat = out / f"sub-{label}" / "anat"
        assert json.loads((anat / f"sub-{label}_rec-svr_T2w.json").read_text())["quality"]
        nib.load(anat / f"sub-{label}_rec-svr_T2w.nii.gz").get_fdata()


def test_default_workers_fill_the_cpus_but_share_no_gpu(monkeypatch):
    from slice2vol.core import engine

    monkeypatch.setattr(engine.os, "cpu_count", lambda: 16)
    assert engine.default_workers(1) == 16 and engine.default_workers(4) == 4 and engine.default_workers(None) == 1
    assert engine.default_workers(1, on_gpu=True) == 1  # every task would use the one card
