"""``slice2vol train-csvr``: train the cSVR network on stacks simulated on the fly.

Data: CRL 2017 atlases for training (every case a fresh random simulation, see :mod:`.data`),
the spina-bifida 2021 atlases for validation (another population and anatomy, so the
validation TRE measures generalisation, not memorisation of the 18 training brains).
Loss: eq. 9, multi-layer L2 on the slice pixels' positions (:func:`multilayer_loss`).
Optimiser: Adam with polynomial decay ``lr = lr0 (1 - step / steps)^0.9``.
Checkpoints (model, optimiser, step, every RNG state) are written atomically to
``OUTPUT/checkpoint.pt`` and training resumes from there when it exists.  Validation TRE (eq. 10
via :func:`slice2vol.evaluation.metrics.slice_tre` / :func:`~slice2vol.evaluation.metrics.tre_summary`) goes to
``OUTPUT/log.csv``.  ``--export`` writes float16 weights for :mod:`slice2vol.methods.csvr.infer`.

Run as ``slice2vol train-csvr --help``.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from slice2vol.core.image import SliceSet
from slice2vol.errors import Slice2VolError
from slice2vol.evaluation.metrics import slice_tre, tre_summary
from slice2vol.io import shared_data_dir
from slice2vol.methods.csvr.inputs import NetworkInput, prepare_inputs, to_network_poses, to_original_poses
from slice2vol.methods.csvr.network import CSVRConfig, CSVRNet, LevelState, initial_positions
from slice2vol.simulation.simulate import SimulationResult
from slice2vol.simulation.splits import VALIDATION_ATLASES  # the fixed atlas split (slice2vol.simulation.splits)
from slice2vol.training.csvr_data import atlas_folders, load_atlas, sample_training_case, validation_case

__all__ = ["multilayer_loss", "train_step", "split_motions", "evaluate_tre", "export_weights", "train_command"]

log = logging.getLogger(__name__)

LOSS_UNIT_MM = 10.0  # positions enter the loss in cm so its scale is O(1) for Adam's first steps


def multilayer_loss(states: list[LevelState], gt_poses: list[Tensor], literal: bool = False) -> Tensor:
    """Eq. 9 on the slice pixels (units of ``LOSS_UNIT_MM``^2, mask-weighted mean over pixels).

    Args:
        states: the network's per-level outputs (coarse to fine).
        gt_poses: per stack ``(N, 4, 4)`` true poses in the network's (cropped, centred) frames.
        literal: ``True`` takes eq. 9 as printed, ``|f_GT - mean_s f^s|^2`` (the levels' fields
            averaged first, each upsampled to the finest level); ``False`` (default) averages
            the per-level errors ``mean_s |f_GT - f^s|^2`` (deep supervision).  As printed, the
            last level could compensate the others' errors and never be right on its own, yet
            the last level is what becomes the output pose; hence the default.
    """
    if literal:
        fine = states[-1]
        num = den = 0.0
        for k, P in enumerate(gt_poses):
            m = fine.masks[k]
            gt = initial_positions(P, fine.coords[k])
            mean = 0
            for st in states:
                mean = mean + _to_finest(st.positions[k], st.coords[k], fine.coords[k])
            mean = mean / len(states)
            num = num + (((mean - gt) / LOSS_UNIT_MM) ** 2).sum(-1).mul(m).sum()
            den = den + m.sum()
        return num / den.clamp_min(1e-6)
    total = 0.0
    for st in states:
        num = den = 0.0
        for k, P in enumerate(gt_poses):
            m = st.masks[k]
            gt = initial_positions(P, st.coords[k])
            num = num + (((st.positions[k] - gt) / LOSS_UNIT_MM) ** 2).sum(-1).mul(m).sum()
            den = den + m.sum()
        total = total + num / den.clamp_min(1e-6)
    return total / len(states)


def _to_finest(x: Tensor, coords: Tensor, fine: Tensor) -> Tensor:
    """Coarse positions ``(N, h, w, 3)`` read at the finest level's pixels by repeated bilinear
    doubling (level ``l + 1`` pixel ``m`` is level ``l`` pixel ``2 m``)."""
    from slice2vol.methods.csvr.network import _upsample

    while x.shape[1] < fine.shape[0] or x.shape[2] < fine.shape[1]:
        x = _upsample(x, min(fine.shape[0], 2 * x.shape[1]), min(fine.shape[1], 2 * x.shape[2]))
    return x


def split_motions(text: str) -> list[str]:
    """Motion level names from ``"a,b,c"``, each checked by :func:`~slice2vol.simulation.motion.motion_level`."""
    from slice2vol.simulation.motion import motion_level

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise Slice2VolError(f"no motion level in {text!r}")
    for m in names:
        motion_level(m)
    return names


def _case_inputs(case: SimulationResult, spacing: float) -> tuple[NetworkInput, list[Tensor]]:
    inp = prepare_inputs(case.stacks, spacing)
    return inp, to_network_poses(case.true_poses, inp)


def poly_lr(lr0: float, step: int, steps: int, power: float = 0.9) -> float:
    """Polynomial decay from ``lr0`` at step 0 to 0 at ``steps``."""
    return lr0 * max(0.0, 1 - step / max(steps, 1)) ** power


def train_step(net: CSVRNet, opt: torch.optim.Optimizer, inp: NetworkInput, gt: list[Tensor],
               literal: bool = False, clip: float = 1.0) -> float:
    """One optimisation step on one case; returns the loss before the step."""
    net.train()
    opt.zero_grad(set_to_none=True)
    _, states = net(inp)
    loss = multilayer_loss(states, gt, literal)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)  # csvr motion has rare huge errors
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate_tre(net: CSVRNet, cases: list[SimulationResult]) -> dict:
    """Median-over-stacks TRE (eq. 10, after removing one global rigid transform) of the header
    poses and of the network, per case and averaged.  Returns plain floats (mm)."""
    net.eval()
    out = {"header": [], "network": [], "network_mean": [], "header_mean": []}
    for case in cases:
        ss = SliceSet.from_stacks(case.stacks)
        gt = np.concatenate(case.true_poses)
        hdr = np.concatenate([st.poses for st in case.stacks])
        inp = prepare_inputs(case.stacks, net.config.spacing)
        poses, _ = net(inp)
        est = to_original_poses(poses, inp)
        th = tre_summary(slice_tre(hdr, gt, ss.coords, ss.slice_id), ss.stack_id)
        tn = tre_summary(slice_tre(est, gt, ss.coords, ss.slice_id), ss.stack_id)
        out["header"].append(th["median"])
        out["network"].append(tn["median"])
        out["header_mean"].append(th["mean"])
        out["network_mean"].append(tn["mean"])
    return out


# ------------------------------------------------------------------------------ checkpoints


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(rng: np.random.Generator) -> dict:
    """Every RNG state as tensors and plain data, so checkpoints load with ``weights_only=True``
    (numpy's legacy state holds an ndarray, which that loader refuses: stored as a list)."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    return {"numpy_gen": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy_global": {"key": str(key), "keys": [int(k) for k in keys], "pos": int(pos),
                             "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def _set_rng_state(rng: np.random.Generator, s: dict) -> None:
    rng.bit_generator.state = s["numpy_gen"]
    torch.set_rng_state(s["torch"])
    py = s["python"]  # a tuple pickled is a tuple again, but a list-of-lists form is accepted too
    random.setstate((py[0], tuple(py[1]), py[2]))
    g = s["numpy_global"]
    np.random.set_state((g["key"], np.asarray(g["keys"], dtype=np.uint32), g["pos"], g["has_gauss"],
                         g["cached_gaussian"]))


def export_weights(net: CSVRNet, path: Path, meta: dict) -> Path:
    """Write float16 weights + architecture + ``meta`` (training record) for :func:`.infer.load_model`."""
    state = {k: v.detach().to(torch.float16) for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({"config": net.config.to_dict(), "state_dict": state, "meta": meta}, path)
    return path


# ------------------------------------------------------------------------------------ CLI


def _deadline_seconds(args) -> float:
    """Seconds from now until training must stop (inf when neither limit is given)."""
    limit = math.inf
    if args.max_minutes is not None:
        limit = args.max_minutes * 60
    if args.deadline:
        now = datetime.now(timezone.utc)
        hh, mm = (int(x) for x in args.deadline.split(":"))
        end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if end < now:
            raise Slice2VolError(f"--deadline {args.deadline} UTC has already passed")
        limit = min(limit, (end - now).total_seconds())
    return limit


def _resume(path: Path, rng: np.random.Generator, lr: float) -> tuple[CSVRNet, torch.optim.Optimizer, int, float]:
    """Network, optimiser, step and elapsed seconds from a checkpoint, RNG states restored.

    Loaded with ``weights_only=True`` (tensors and plain data only: a crafted pickle cannot run
    code); anything else, or a file of the wrong structure, is one :class:`Slice2VolError`.
    """
    from slice2vol.methods.csvr.infer import safe_load

    ck = safe_load(path, "training checkpoint", "train-csvr checkpoint")
    try:
        net = CSVRNet(CSVRConfig.from_dict(ck["config"]))
        net.load_state_dict(ck["model"])
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        opt.load_state_dict(ck["optimizer"])
        step, elapsed0 = int(ck["step"]), float(ck.get("elapsed_s", 0.0))
        _set_rng_state(rng, ck["rng"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise Slice2VolError(f"training checkpoint {path}: not a slice2vol train-csvr checkpoint "
                             f"({type(exc).__name__}: {detail}); move it away to start afresh") from None
    return net, opt, step, elapsed0


def train_command(args: argparse.Namespace) -> int:
    """Train (or resume) as described in the module doc."""
    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()
    budget = _deadline_seconds(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.csv"
    data_dir = Path(args.data) if args.data else shared_data_dir()
    config = CSVRConfig()
    if args.channels:
        config.channels = tuple(int(c) for c in args.channels.split(","))
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    net = CSVRNet(config)
    if args.init_weights:
        from slice2vol.methods.csvr.infer import load_model

        net = load_model(args.init_weights)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    step, elapsed0 = 0, 0.0
    motions = split_motions(args.motion)
    split_motions(args.val_motion)
    if ckpt_path.exists():
        net, opt, step, elapsed0 = _resume(ckpt_path, rng, args.lr)
        log.warning("resumed from %s at step %d", ckpt_path, step)
    n_params = sum(p.numel() for p in net.parameters())
    log.warning("cSVR: %d parameters, %d threads", n_params, torch.get_num_threads())
    train_atlases = [load_atlas(f, args.atlas_resolution) for f in atlas_folders(data_dir, "crl2017")]
    sb = {f.name: f for f in atlas_folders(data_dir, "spina_bifida2021")}
    val_cases = [validation_case(load_atlas(sb[name], 1.0, 6.0), 1000 + i, args.val_motion)
                 for i, name in enumerate(VALIDATION_ATLASES) if name in sb]
    log.warning("loaded %d training atlases, %d validation cases in %.1f s", len(train_atlases), len(val_cases),
                time.perf_counter() - t_start)
    new_log = not log_path.exists()
    fields = ["step", "elapsed_s", "lr", "train_loss", "val_tre_header_median", "val_tre_network_median",
              "val_tre_header_mean", "val_tre_network_mean", "val_per_case_network"]
    fh = open(log_path, "a", newline="")
    writer = csv.DictWriter(fh, fieldnames=fields)
    if new_log:
        writer.writeheader()

    def checkpoint() -> None:
        _atomic_save({"config": net.config.to_dict(), "model": net.state_dict(), "optimizer": opt.state_dict(),
                      "step": step, "elapsed_s": elapsed0 + time.perf_counter() - t_start, "rng": _rng_state(rng),
                      "args": vars(args)}, ckpt_path)

    def validate(train_loss: float) -> dict:
        r = evaluate_tre(net, val_cases)
        row = {"step": step, "elapsed_s": round(elapsed0 + time.perf_counter() - t_start, 1),
               "lr": poly_lr(args.lr, step, args.steps), "train_loss": round(train_loss, 5),
               "val_tre_header_median": round(float(np.mean(r["header"])), 3),
               "val_tre_network_median": round(float(np.mean(r["network"])), 3),
               "val_tre_header_mean": round(float(np.mean(r["header_mean"])), 3),
               "val_tre_network_mean": round(float(np.mean(r["network_mean"])), 3),
               "val_per_case_network": " ".join(f"{x:.2f}" for x in r["network"])}
        writer.writerow(row)
        fh.flush()
        log.warning("step %d: loss %.4f, val TRE median header %.2f mm -> network %.2f mm", step, train_loss,
                    row["val_tre_header_median"], row["val_tre_network_median"])
        return row

    losses: list[float] = []
    last = None
    if step == 0 and val_cases:
        last = validate(float("nan"))
    step_times: list[float] = []
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            # Stop before a step that would overrun the budget (mean step time as the estimate).
            if time.perf_counter() - t_start + (np.mean(step_times[-20:]) if step_times else 0) * 2 > budget:
                log.warning("time budget reached at step %d", step)
                break
            for g in opt.param_groups:
                g["lr"] = poly_lr(args.lr, step, args.steps)
            # one level draws nothing, so a single-level run replays the same cases as before the mix existed
            motion = motions[int(rng.integers(len(motions)))] if len(motions) > 1 else motions[0]
            case = sample_training_case(train_atlases, rng, config.spacing, motion)
            inp, gt = _case_inputs(case, config.spacing)
            losses.append(train_step(net, opt, inp, gt, args.literal_loss))
            step += 1
            step_times.append(time.perf_counter() - t0)
            if step % args.ckpt_every == 0:
                checkpoint()
            if val_cases and step % args.val_every == 0:
                last = validate(float(np.mean(losses[-args.val_every:])))
                checkpoint()
    finally:
        checkpoint()
    if val_cases and (last is None or last["step"] != step):
        last = validate(float(np.mean(losses[-args.val_every:])) if losses else float("nan"))
    fh.close()
    if args.export:
        meta = {"steps": step, "train_seconds": round(elapsed0 + time.perf_counter() - t_start, 1),
                "lr": args.lr, "schedule_steps": args.steps, "motion": args.motion, "val_motion": args.val_motion,
                "init_weights": args.init_weights, "parameters": n_params,
                "validation": last, "validation_atlases": list(VALIDATION_ATLASES),
                "date": datetime.now(timezone.utc).isoformat(timespec="minutes")}
        export_weights(net, Path(args.export), meta)
        log.warning("wrote %s", args.export)
    return 0
