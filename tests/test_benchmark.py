"""``slice2vol benchmark``: argument checks, aggregation, resumability, README markers.

Fast tests run no reconstruction: jobs are stood in for by prepared result files or a
monkeypatched worker; the one real end-to-end run is marked slow.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from slice2vol.cli.parser import build_parser, main
from slice2vol.errors import Slice2VolError
from slice2vol.evaluation import benchmark as bm
from slice2vol.evaluation.benchmark import cases as bm_cases  # where ensure_case looks simulate_case up
from slice2vol.evaluation.benchmark import runner as bm_runner  # where the parent looks its workers up


@pytest.fixture
def fake_data(tmp_path) -> Path:
    """A data folder with two (empty) atlas entries: enough for the argument checks, which only
    look for the files; nothing is simulated from them in the fast tests."""
    root = tmp_path / "data"
    for a in ("crl2017/STA23", "crl2017/STA29", "spina_bifida2021/GA27_operated"):
        d = root / "fetal_atlases" / a
        d.mkdir(parents=True)
        (d / "t2.nii.gz").write_bytes(b"")
        (d / "mask.nii.gz").write_bytes(b"")
    return root


def cfg_for(argv: list) -> bm.BenchmarkConfig:
    return bm.config_from_args(build_parser().parse_args(["benchmark", *map(str, argv)]))


def record(method: str, motion: str, case: str, **values) -> dict:
    base = {"method": method, "motion": motion, "case": case, "atlas": case.split("_")[0], "seed": 0,
            "status": "ok", "device": "cpu", "threads": 1, "psnr": 20.0, "ssim": 0.9, "nrmse": 0.1,
            "tre_median_mm": 1.0, "time_s": 10.0, "peak_rss_mb": 500.0, "gpu_peak_mb": None}
    base.update(values)
    return base


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("extra, message", [
    (["--atlases", "STA23,STA99"], "unknown atlas 'STA99'"),
    (["--atlases", "crl2017/STA23"], "unknown atlas 'crl2017/STA23'"),
    (["--motion", "mild,wild"], "unknown motion level 'wild'"),
    (["--methods", "svr,nosuchmethod"], "unknown method 'nosuchmethod'"),
    (["--methods", "naive"], "always evaluated"),
    (["--seeds", "0,x"], "--seeds: expected integers"),
    (["--resolution", "0"], "--resolution must be positive"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--report-picture", "p.png"], "needs --update-readme"),
])
def test_bad_arguments_one_line_exit_2(fake_data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    rc = main(["benchmark", "--data", str(fake_data), "--atlases", "STA23", "--output", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("slice2vol: error:") and message in err[0], err
    assert not out.exists()  # nothing written on failure


def test_atlases_from_both_collections(fake_data, tmp_path):
    cfg = cfg_for(["--data", fake_data, "--atlases", "STA23,GA27_operated", "--output", tmp_path / "o"])
    assert cfg.atlases == ["STA23", "GA27_operated"]
    assert bm.atlas_dir(fake_data, "GA27_operated") == fake_data / "fetal_atlases" / "spina_bifida2021" / "GA27_operated"
    assert bm.atlas_dir(fake_data, "STA23").parent.name == "crl2017"
    assert bm.atlas_dir(fake_data, "GA99") is None


def test_missing_data_folder(tmp_path, capsys):
    rc = main(["benchmark", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "data folder" in capsys.readouterr().err


def test_output_is_a_file(fake_data, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["benchmark", "--data", str(fake_data), "--atlases", "STA23", "--output", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_lists_and_defaults(fake_data, tmp_path):
    cfg = cfg_for(["--data", fake_data, "--atlases", "STA29,STA23", "STA29", "--motion", "mild", "severe",
                   "--seeds", "1,0", "--output", tmp_path / "o"])
    assert cfg.atlases == ["STA29", "STA23"] and cfg.motion == ["mild", "severe"] and cfg.seeds == [1, 0]
    assert cfg.methods == bm.default_methods() and "svr" in cfg.methods
    assert all("-" not in m for m in cfg.methods)
    jobs = bm.jobs_of(cfg)
    assert len(jobs) == 2 * 2 * 2 * (len(cfg.methods) + 1)
    assert jobs[0].method == bm.NAIVE and jobs[0].case == "STA29_mild_seed1"
    assert "--atlases STA29,STA23" in cfg.command_line()


# ------------------------------------------------------------------------------ aggregation


def test_aggregate_mean_sd_and_table():
    recs = [record("svr", "mild", "A_mild_seed0", psnr=26.0, time_s=10.0),
            record("svr", "mild", "A_mild_seed1", psnr=28.0, time_s=20.0),
            record("svr", "severe", "A_severe_seed0", psnr=15.0),
            record("svr", "severe", "A_severe_seed1", status="failed", psnr=None, error="boom"),
            record("naive", "mild", "A_mild_seed0", psnr=18.0),
            record("naive", "mild", "A_mild_seed1", psnr=19.0)]
    rows = bm.aggregate(recs)
    assert [(r["method"], r["motion"]) for r in rows] == [("naive", "mild"), ("svr", "mild"), ("svr", "severe")]
    svr_mild = rows[1]
    assert svr_mild["n"] == 2 and svr_mild["failed"] == 0
    assert svr_mild["psnr"]["mean"] == pytest.approx(27.0)
    assert svr_mild["psnr"]["sd"] == pytest.approx(2 ** 0.5)  # sample sd (ddof=1)
    assert svr_mild["time_s"]["mean"] == pytest.approx(15.0)
    severe = rows[2]
    assert severe["n"] == 1 and severe["failed"] == 1 and severe["psnr"]["sd"] is None
    table = bm.markdown_table(rows)
    assert "| svr | mild | 2 | 27.00 ± 1.41 |" in table
    assert "| svr | severe | 1 (1 failed) | 15.00 |" in table
    assert "peak CUDA MB" not in table  # no job ran on CUDA
    assert table.count("\n") == 2 + len(rows) - 1


def test_write_results_files(tmp_path, fake_data):
    cfg = cfg_for(["--data", fake_data, "--atlases", "STA23", "--motion", "mild,moderate", "--output", tmp_path / "o"])
    cfg.output.mkdir()
    recs = [record(m, mo, f"STA23_{mo}_seed{s}", seed=s, psnr=20 + s + (5 if m == "svr" else 0))
            for m in ("naive", "svr") for mo in ("mild", "moderate") for s in (0, 1)]
    bm.write_results(recs, cfg)
    for name in (bm.RESULTS_CSV, bm.RESULTS_MD, bm.PLOT_QUALITY, bm.PLOT_TIME):
        assert (cfg.output / name).is_file()
    with open(cfg.output / bm.RESULTS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["method"] for r in rows} == {"naive", "svr"}
    md = (cfg.output / bm.RESULTS_MD).read_text()
    assert md.startswith("Machine: ") and "Command: `slice2vol benchmark" in md and "torch " in md
    assert "| svr | moderate | 2 | 25.50 ± 0.71 |" in md
    assert (cfg.output / bm.PLOT_QUALITY).read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------ resumability


def _prepare_case(output: Path, job: bm.Job, status: str = "ok") -> None:
    case_dir = output / "cases" / job.case
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / bm.CASE_JSON).write_text("{}")
    d = case_dir / job.method
    d.mkdir(exist_ok=True)
    rec = record(job.method, job.motion, job.case, seed=job.seed, status=status)
    (d / bm.RESULT_JSON).write_text(json.dumps(rec))


def test_rerun_skips_finished_jobs_and_retries_failed(fake_data, tmp_path, monkeypatch, capsys):
    cfg = cfg_for(["--data", fake_data, "--atlases", "STA23", "--motion", "mild", "--seeds", "0,1",
                   "--methods", "svr", "--device", "cpu", "--no-progress", "--output", tmp_path / "o"])
    cfg.processes = False  # dask workers in this process, so they see the monkeypatched functions
    jobs = bm.jobs_of(cfg)
    assert len(jobs) == 4
    for job in jobs:
        _prepare_case(cfg.output, job, status="failed" if job == jobs[3] else "ok")
    (cfg.output / "cases" / jobs[2].case / jobs[2].method / bm.RESULT_JSON).unlink()  # one job never finished

    ran = []

    def fake_worker(c, job, device):
        ran.append((job.case, job.method))
        rec = record(job.method, job.motion, job.case, seed=job.seed)
        (c.output / "cases" / job.case / job.method / bm.RESULT_JSON).write_text(json.dumps(rec))
        return rec

    def no_simulation(*a, **k):
        raise AssertionError("a case whose case.json exists must not be simulated again")

    monkeypatch.setattr(bm_runner, "run_worker", fake_worker)
    monkeypatch.setattr(bm_cases, "simulate_case", no_simulation)
    assert bm.run_benchmark(cfg) == 0
    assert sorted(ran) == sorted([(jobs[2].case, jobs[2].method), (jobs[3].case, jobs[3].method)])
    assert "2 already done" in capsys.readouterr().out

    ran.clear()
    assert bm.run_benchmark(cfg) == 0  # everything finished: nothing runs
    assert ran == []
    with open(cfg.output / bm.RESULTS_CSV) as f:
        assert len(list(csv.DictReader(f))) == 4


def test_failed_job_recorded_run_continues_exit_1(fake_data, tmp_path, monkeypatch, capsys):
    cfg = cfg_for(["--data", fake_data, "--atlases", "STA23,STA29", "--motion", "mild", "--seeds", "0",
                   "--methods", "svr", "--device", "cpu", "--no-progress", "--output", tmp_path / "o"])
    cfg.processes = False

    def simulate(c, atlas, motion, seed, case_dir):
        if atlas == "STA29":
            raise ValueError("no such brain")
        case_dir.mkdir(parents=True, exist_ok=True)
        (case_dir / bm.CASE_JSON).write_text("{}")

    monkeypatch.setattr(bm_cases, "simulate_case", simulate)

    def worker(c, job, device):
        ok = not (job.atlas == "STA23" and job.method == "svr")
        rec = record(job.method, job.motion, job.case) if ok else {
            "method": job.method, "status": "failed", "error": "RuntimeError: boom", "case": job.case}
        p = bm.result_path(c.output, job)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rec))
        return rec

    monkeypatch.setattr(bm_runner, "run_worker", worker)
    assert bm.run_benchmark(cfg) == 1
    err = capsys.readouterr().err
    assert "3 job(s) failed" in err and "STA23_mild_seed0 svr: RuntimeError: boom" in err
    assert "STA29_mild_seed0 naive: simulation: ValueError: no such brain" in err
    with open(cfg.output / bm.RESULTS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and [r["status"] for r in rows].count("failed") == 3
    md = (cfg.output / bm.RESULTS_MD).read_text()
    assert "| svr | mild | 0 (2 failed) |" in md and "| naive | mild | 1 (1 failed) |" in md


def test_jobs_run_on_a_local_cluster_of_processes(fake_data, tmp_path, capsys):
    """The default engine: a LocalCluster of 2 worker processes (nothing patched reaches them).
    The fake atlases cannot be simulated, so every job fails with the simulation's reason, and the
    run still writes its results and exits 1."""
    rc = main(["benchmark", "--data", str(fake_data), "--atlases", "STA23,STA29", "--motion", "mild", "--seeds", "0",
               "--methods", "svr", "--device", "cpu", "--workers", "2", "--no-progress",
               "--output", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 1 and "on 2 dask worker(s)" in out
    assert "4 job(s) failed" in err and "STA29_mild_seed0 svr: simulation:" in err
    with open(tmp_path / "o" / bm.RESULTS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"failed"}


def test_unreachable_scheduler_is_one_line(fake_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("slice2vol.core.engine.CONNECT_TIMEOUT", "2s")
    rc = main(["benchmark", "--data", str(fake_data), "--atlases", "STA23", "--motion", "mild", "--seeds", "0",
               "--methods", "svr", "--scheduler", "tcp://127.0.0.1:1", "--no-progress", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--scheduler tcp://127.0.0.1:1: cannot connect" in err[0], err


def test_real_worker_failure_is_captured(tmp_path, fake_data):
    """A worker process that crashes (here: no case files) gives a failed result, not an exception."""
    cfg = cfg_for(["--data", fake_data, "--atlases", "STA23", "--motion", "mild", "--seeds", "0",
                   "--methods", "svr", "--device", "cpu", "--threads", "1", "--output", tmp_path / "o"])
    job = bm.jobs_of(cfg)[1]
    res = bm.run_worker(cfg, job, "cpu")
    assert res["status"] == "failed" and "case.json" in res["error"]
    assert json.loads(bm.result_path(cfg.output, job).read_text())["status"] == "failed"
    assert not bm.is_done(cfg.output, job)


def test_other_settings_refused(fake_data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / bm.SETTINGS_JSON).write_text(json.dumps({"settings": {"resolution": 1.0, "thickness": 3.0,
                                                                 "noise": 0.02, "iterations": None}}))
    cfg = cfg_for(["--data", fake_data, "--atlases", "STA23", "--output", out, "--resolution", "0.8"])
    with pytest.raises(Slice2VolError, match="other settings"):
        bm.run_benchmark(cfg)


# ------------------------------------------------------------------------------ README


README = """# x

## Benchmark

<!-- benchmark:start -->
placeholder
<!-- benchmark:end -->

<!-- report-picture:start -->
<!-- report-picture:end -->

## After
"""


def test_replace_between_markers():
    text = bm.replace_between_markers(README, "benchmark", "NEW")
    assert "placeholder" not in text and "<!-- benchmark:start -->\nNEW\n<!-- benchmark:end -->" in text
    assert bm.replace_between_markers(text, "benchmark", "NEW") == text  # idempotent
    assert text.endswith("## After\n")
    with pytest.raises(Slice2VolError, match="exactly one"):
        bm.replace_between_markers("no markers", "benchmark", "x")


def test_update_readme(tmp_path, fake_data):
    cfg = cfg_for(["--data", fake_data, "--atlases", "STA23", "--motion", "mild", "--output", tmp_path / "res"])
    cfg.output.mkdir()
    bm.write_results([record(m, "mild", f"STA23_mild_seed{s}", seed=s) for m in ("naive", "svr") for s in (0, 1)],
                     cfg)
    readme = tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    readme.write_text(README)
    picture = tmp_path / "views.png"
    picture.write_bytes((cfg.output / bm.PLOT_TIME).read_bytes())
    bm.update_readme(readme, cfg.output, report_picture=picture)
    text = readme.read_text()
    assert "placeholder" not in text and "| svr | mild | 2 |" in text and "Machine: " in text
    assert "![PSNR and SSIM vs motion](benchmarks/results/benchmark_psnr_ssim_vs_motion.png)" in text
    assert "(benchmarks/results/report_picture.png)" in text
    for name in ("benchmark_psnr_ssim_vs_motion.png", "benchmark_time_per_method.png", "report_picture.png",
                 "benchmark_results.csv"):
        assert (readme.parent / "benchmarks" / "results" / name).is_file()
    once = readme.read_text()
    bm.update_readme(readme, cfg.output, report_picture=picture)
    assert readme.read_text() == once
    assert text.endswith("## After\n")


def test_readme_without_markers_refused_before_running(fake_data, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    out = tmp_path / "o"
    rc = main(["benchmark", "--data", str(fake_data), "--atlases", "STA23", "--output", str(out),
               "--update-readme", str(readme)])
    assert rc == 2 and "benchmark:start" in capsys.readouterr().err and not out.exists()


def test_update_readme_without_results(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    with pytest.raises(Slice2VolError, match="results.md"):
        bm.update_readme(readme, tmp_path / "none")


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_end_to_end_tiny(shared_data, tmp_path, capsys):
    """One real case at a coarse grid: simulate, reconstruct, evaluate; a rerun recomputes nothing."""
    argv = ["benchmark", "--data", str(shared_data), "--atlases", "STA23", "--motion", "mild", "--seeds", "0",
            "--methods", "svr", "--resolution", "2", "--iterations", "1", "--device", "cpu", "--threads", "1",
            "--no-progress", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    with open(tmp_path / "o" / bm.RESULTS_CSV) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"naive", "svr"} and all(r["status"] == "ok" for r in rows.values())
    assert float(rows["svr"]["psnr"]) > float(rows["naive"]["psnr"])
    case = tmp_path / "o" / "cases" / "STA23_mild_seed0"
    stamps = {p: p.stat().st_mtime_ns for p in case.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in case.rglob("*") if p.is_file()} == stamps
