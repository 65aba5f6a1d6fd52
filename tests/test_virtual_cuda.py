"""The CUDA path on a machine without a GPU: every method under a virtual CUDA device
(``tests/vcuda.py``) takes no step that real CUDA would refuse (mixed devices, numpy or numba on
device data, CPU generators for device draws).  What it cannot see (numerics, memory, speed) needs
a lent GPU: ``benchmarks/gpu_check.sh``."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from vcuda import is_v, virtual_cuda


def test_the_virtual_device_catches_what_cuda_refuses():
    with virtual_cuda() as rec:
        dev = torch.device("cuda")
        a = torch.zeros(5, device=dev)
        assert a.device.type == "cuda" and a.is_cuda and torch.cuda.is_available()
        b = torch.ones(5)
        _ = a + b  # 1: mixed devices
        _ = a + torch.tensor(2.0)  # a CPU 0-dim tensor is a scalar: allowed
        _ = a[torch.tensor([0, 1])]  # a device tensor indexed on the CPU: allowed
        _ = b[torch.tensor([0, 1], device=dev)]  # 2: CPU tensor, device index
        _ = a.cpu().numpy()  # allowed
        _ = np.asarray(a)  # 3: numpy of a device tensor
        m = torch.nn.Linear(3, 2).to(dev)
        y = m(torch.randn(4, 3, device=dev))
        assert y.device.type == "cuda"
        _ = torch.rand(3, generator=torch.Generator(), device=dev)  # 4: CPU generator, device draw
        _ = torch.randperm(5, generator=torch.Generator()).to(dev)  # allowed
        opt = torch.optim.Adam(m.parameters())
        y.sum().backward()
        opt.step()  # allowed
        _ = torch.zeros(5, device=dev).index_add_(0, torch.arange(5), a)  # 5: CPU index into a device tensor
    kinds = sorted(v["kind"] for v in rec.violations.values())
    assert len(rec.violations) == 5, rec.report()
    assert sum("mixed" in k for k in kinds) == 2 and sum("numpy" in k for k in kinds) == 1
    assert sum("generator" in k for k in kinds) == 1 and sum("indexed" in k for k in kinds) == 1
    # everything is restored afterwards
    assert torch.zeros(2).device.type == "cpu" and not is_v(torch.zeros(2))
    assert torch.cuda.is_available() is torch.cuda.is_available()  # the real function again (no GPU here)


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    """The bundled demo stacks, 3x coarser in-plane (fast enough for every method at 3 mm)."""
    from slice2vol.cli.commands import DEMO_DIR

    dst = tmp_path_factory.mktemp("vcuda_case")
    meta = json.loads((DEMO_DIR / "demo.json").read_text())
    f = 3
    for name, is_mask in [(s, False) for s in meta["stacks"]] + [(m, True) for m in meta["stack_masks"]]:
        img = nib.load(DEMO_DIR / name)
        a = np.asarray(img.dataobj, dtype=np.float32)
        H, W = (a.shape[0] // f) * f, (a.shape[1] // f) * f
        a = a[:H, :W].reshape(H // f, f, W // f, f, a.shape[2]).mean((1, 3))
        S = np.eye(4)
        S[0, 0] = S[1, 1] = f
        S[0, 3] = S[1, 3] = (f - 1) / 2  # the coarse voxel's centre is the mean of the fine ones
        nib.save(nib.Nifti1Image((a > 0.5).astype(np.uint8) if is_mask else a, img.affine @ S), dst / name)
    for key in ("ground_truth", "ground_truth_mask", "gt_poses"):
        (dst / meta[key]).write_bytes((DEMO_DIR / meta[key]).read_bytes())
    (dst / "case.json").write_text(json.dumps(meta))  # the benchmark worker's case record
    return dst, meta


@pytest.mark.parametrize("method", [
    ["--method", "svr"],
    ["--method", "csvr", "--refine"],
    pytest.param(["--method", "gaussian"], marks=pytest.mark.slow),
    pytest.param(["--method", "auto"], marks=pytest.mark.slow),
], ids=lambda m: "-".join(a.lstrip("-") for a in m[1:]))
def test_reconstruct_on_cuda_takes_no_step_cuda_would_refuse(small_case, tmp_path, method):
    from slice2vol.cli.parser import main

    case, meta = small_case
    out = tmp_path / "recon.nii.gz"
    argv = ["reconstruct", *[str(case / s) for s in meta["stacks"]],
            "--stack-masks", *[str(case / m) for m in meta["stack_masks"]], "--thickness", "3",
            "-o", str(out), "--output-transforms", str(tmp_path / "t.json"), "--report", str(tmp_path / "report"),
            "--resolution", "3", "--device", "cuda", "--no-progress", *method]
    torch.set_num_threads(1)
    try:
        with virtual_cuda() as rec:
            rc = main(argv)
    finally:
        torch.set_num_threads(2)
    assert rc == 0
    assert not rec.violations, rec.report()
    assert rec.calls > 1000  # the run really went through the mode
    assert out.exists() and (tmp_path / "report").is_dir()


@pytest.mark.slow
def test_benchmark_worker_on_cuda_takes_no_step_cuda_would_refuse(small_case):
    """The benchmark's job (reconstruction, then metrics, TRE, slice consistency, quality verdict)."""
    from slice2vol.evaluation.benchmark.worker import run_job

    case, _ = small_case
    with virtual_cuda() as rec:
        out = run_job(case, "svr", device="cuda", resolution=3.0, threads=1)
    torch.set_num_threads(2)
    assert not rec.violations, rec.report()
    assert out["device"].startswith("cuda") and np.isfinite(out["psnr"]) and np.isfinite(out["tre_median_mm"])
