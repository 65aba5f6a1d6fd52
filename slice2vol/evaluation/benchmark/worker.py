"""One job in its own process (``python -m slice2vol.evaluation.benchmark.worker``): reconstruct or
build the naive baseline of one case and evaluate it."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from slice2vol.evaluation.benchmark.settings import CASE_JSON, NAIVE, RESULT_JSON

log = logging.getLogger("slice2vol")


# ------------------------------------------------------------------------------------ worker


def run_job(case_dir: Path, method_name: str, device: str = "cpu", resolution: float = 0.8,
            iterations: int | None = None, threads: int | None = None) -> dict:
    """Reconstruct (or build the naive baseline of) one case and evaluate it; returns a JSON-ready dict.

    Meant to run in a fresh process (:func:`worker_main`) so the peak RSS is this job's alone.
    Times in s, memory in MB, TRE in mm.
    """
    import torch

    from slice2vol import io
    from slice2vol.core.image import Volume
    from slice2vol.core.memory import peak_rss_mb, reset_peak_rss, status_mb
    from slice2vol.core.preprocess import prepare
    from slice2vol.core.runtime import resolve_device, seed_everything, synchronize
    from slice2vol.evaluation.metrics import (
        compare_volumes,
        match_poses,
        naive_consistency,
        slice_consistency,
        slice_tre,
        tre_summary,
    )
    from slice2vol.methods.run import crop_to_roi, method_variant, run_reconstruction

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    seed_everything(0)
    meta = json.loads((case_dir / CASE_JSON).read_text(encoding="utf-8"))
    stacks = io.load_stacks([case_dir / f for f in meta["stacks"]], meta["thickness"],
                            [case_dir / f for f in meta["stack_masks"]])

    rss_before = status_mb("VmRSS") or 0.0  # after imports and reading the stacks
    hwm_reset = reset_peak_rss()  # if False, the peak below is the whole process's
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"method": method_name}
    t0 = time.perf_counter()
    if method_name == NAIVE:
        prep = prepare(stacks, resolution, have_stack_masks=True, device=dev)
        synchronize(dev)
        t1 = time.perf_counter()
        from slice2vol.methods.naive import naive_baseline

        base = naive_baseline(prep)
        header, data = base.header, base.volume
        synchronize(dev)
        t2 = time.perf_counter()
        poses, result = header.poses, None
        out.update(variant={"method": NAIVE, "options": {}}, time_s=t2 - t1, prepare_s=t1 - t0, method_s=t2 - t1)
    else:
        method, options = method_variant(method_name)
        prep, result, timings = run_reconstruction(stacks, resolution=resolution, method=method, options=options,
                                                   have_stack_masks=True, iterations=iterations, device=dev,
                                                   progress=False)
        synchronize(dev)
        data, poses = result.volume.data, result.poses
        out.update(variant={"method": method, "options": options}, time_s=time.perf_counter() - t0,
                   prepare_s=timings["prepare_s"], method_s=timings["method_s"])
    out.update(peak_rss_mb=peak_rss_mb(), rss_before_mb=rss_before, peak_rss_reset=hwm_reset,
               gpu_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None)

    # ---- image metrics on the ROI grid, as the CLI writes the volume (on the CPU)
    v = crop_to_roi(Volume(data * prep.roi, prep.affine, prep.roi), prep.roi)
    volume = Volume(v.data.detach().float().cpu(), v.affine)
    gt = io.load_volume(case_dir / meta["ground_truth"], case_dir / meta["ground_truth_mask"])
    m = compare_volumes(volume, gt, align=True, scale=True)
    out.update({k: float(m[k]) for k in ("psnr", "ssim", "nrmse", "ncc")})

    # ---- slice TRE against the simulator's true poses (stacks in order, slices by index)
    gt_poses = io.load_poses_json(case_dir / "gt_poses.json")
    ss = prep.slices  # slices in (stack, ascending index) order, as match_poses pairs them

    def tre(p) -> dict:
        P = p.detach().double().cpu().numpy()
        est = [{"index": st.index, "poses": P[ss.stack_slices[s]:ss.stack_slices[s + 1]]}
               for s, st in enumerate(prep.stacks)]
        match = match_poses(est, gt_poses)
        return tre_summary(slice_tre(match.est, match.gt, ss.coords.double().cpu(), ss.slice_id.cpu(), align=True),
                           match.stack_id)

    t = tre(poses)
    out.update(tre_median_mm=t["median"], tre_mean_mm=t["mean"], tre_p90_mm=t["p90"])
    out["tre_stackreg_median_mm"] = tre(ss.poses)["median"]  # the same for every method: where SVR starts

    # ---- slice consistency (acquired vs simulated slices)
    if result is None:
        c = naive_consistency(prep)
        out["excluded_slices"] = 0
    else:
        c = slice_consistency(ss, result.simulated.detach())
        has_pixels = torch.zeros(ss.n_slices, dtype=torch.bool, device=ss.device)
        has_pixels[ss.slice_id] = True
        out["excluded_slices"] = int(((result.slice_weights < 0.5) & has_pixels).sum())  # as the CLI counts them
        if result.history and "start" in result.history[0]:
            out["start"] = result.history[0]["start"]  # csvr --refine: which pose set SVR started from
        from slice2vol.evaluation.quality import assess_quality

        q = assess_quality(prep, result)  # the reference-free verdict the CLI prints, for confusion tables
        out.update(quality_verdict=q.verdict, quality_score=float(q.score), quality_reasons=list(q.reasons))
    out.update(consistency_ssim=float(c["ssim"]), consistency_psnr=float(c["psnr"]), consistency_ncc=float(c["ncc"]))
    out.update(device=str(dev), threads=torch.get_num_threads(), grid="x".join(map(str, prep.shape)),
               slices=int(ss.n_slices), pixels=int(ss.n_pixels), template=int(prep.template))
    return out




def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a worker process: run one job and write ``CASE/METHOD/result.json``."""
    from slice2vol import io

    ap = argparse.ArgumentParser(prog="python -m slice2vol.evaluation.benchmark.worker", description="one benchmark job (internal)")
    ap.add_argument("--worker", type=Path, required=True, metavar="CASE_DIR")
    ap.add_argument("--method", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=float, default=0.8)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    res = run_job(args.worker, args.method, args.device, args.resolution, args.iterations, args.threads)
    res["status"] = "ok"
    io.write_json(res, args.worker / args.method / RESULT_JSON)
    return 0



if __name__ == "__main__":
    sys.exit(worker_main())
