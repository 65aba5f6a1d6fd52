"""Rigid fetal-head motion over acquisition time, for simulation.

Design (after TorchIO's random transforms): a *random* sampler (:func:`sample_motion`) draws every
random number up front into a small JSON-serialisable :class:`MotionParams`; a *deterministic*
function (:func:`apply_motion`) turns parameters into poses.  A simulation is therefore fully
described, and exactly reproducible, from its recorded parameters.

Model.  Time is the global acquisition index of a slice (one unit per slice, stacks acquired one
after another).  Each stack ``s`` has its own trajectory, because stacks are separate scans with
a pause between them during which the fetus moves freely.  The motion of stack ``s`` at time
``t`` is the rigid world transform (rotation about the brain centre ``c``, see
:func:`slice2vol.transforms.rotation_about`)::

    M_s(t) = Rc(p_s(t) + sum_{j: t >= tau_j} d_j) @ Rc(b_s)

* ``b_s``: a bulk transform of the whole stack (6 parameters; the cSVR "imperfect plane
  selection", an in-plane rotation about the stack normal; zero for the other levels);
* ``p_s(t)``: a cubic B-spline *interpolating* ``K`` randomly sampled control parameter vectors
  ``(rx, ry, rz, tx, ty, tz)`` (rad, mm) at ``K`` equally spaced times across the stack's
  acquisition (degree ``min(3, K - 1)`` when ``K < 4``, constant for ``K = 1``);
* ``d_j``: abrupt jumps (steps that persist) at random times ``tau_j`` (level ``severe`` only).

The true pose of slice ``n`` of stack ``s`` is ``M_s(t_n) @ nominal_n``: the slice plane moves
relative to the anatomy, which is what a reconstruction has to undo.

Levels (per-component standard deviations; at the control points the rotation angle is
``sqrt(3) * sd`` and the translation length ``sqrt(3) * sd`` in RMS):

========  ==========  ============  =============  ==========================================
level     rot sd deg  trans sd mm   knot interval  extra
========  ==========  ============  =============  ==========================================
none      0           0             -              true poses are the nominal poses
mild      1.0         0.75          8 slices       RMS angle ~1.7 deg, RMS shift ~1.3 mm
moderate  3.0         2.0           6 slices       RMS angle ~5.2 deg, RMS shift ~3.5 mm
severe    6.0         4.0           4 slices       RMS angle ~10 deg, RMS shift ~7 mm, plus
                                                   Poisson(1 per 20 slices) lasting jumps of
                                                   rot sd 5 deg, trans sd 3 mm per component
csvr      20.0        U[-6.1, 6.1]  K ~ U{1..100}  bulk in-plane rotation U[-12, 12] deg;
                                    per stack      the cSVR paper's training distribution
========  ==========  ============  =============  ==========================================

Sweep levels (the cSVR paper's sensitivity analysis, Fig. 4, varies "the possible range of
sampled rotations and translations separately"): ``rot<A>`` draws every rotation-vector component
of every control transform uniformly in ``[-A, A]`` degrees with no translation, ``trans<T>``
every translation component uniformly in ``[-T, T]`` mm with no rotation (e.g. ``rot20``,
``trans7.5``).  The paper gives neither its ranges nor its trajectory model for the sweep; we use
the named levels' smooth trajectory with a control transform every 6 slices (as ``moderate``), so
the sweep isolates the magnitude of motion from its temporal structure.

For ``csvr`` the paper's "1-100 smooth motion perturbations per stack" is read as ``K`` control
transforms per stack with ``K`` uniform in 1..100 (``K = 1``: one rigid offset for the whole
stack; ``K`` near the slice count: abrupt slice-to-slice motion) and "rotation sd 20 deg" as each
rotation-vector component ``~ N(0, 20 deg)``.  With ~40 slices per stack most stacks then get
more control transforms than slices, i.e. nearly independent slice-to-slice motion (median change
between consecutive slices ~35 deg): a deliberately harsh training distribution.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy.interpolate import make_interp_spline

from .errors import Slice2VolError
from .transforms import rotation_about

__all__ = [
    "MotionLevel",
    "MOTION_LEVELS",
    "motion_level",
    "CSVR_BULK_DEG",
    "CSVR_ROT_SD_DEG",
    "CSVR_TRANS_MM",
    "CSVR_MAX_PERTURBATIONS",
    "StackMotion",
    "MotionParams",
    "sample_motion",
    "trajectory_params",
    "motion_matrices",
    "apply_motion",
]


@dataclass(frozen=True)
class MotionLevel:
    """Amplitudes of one named motion level (see the module table)."""

    rot_sd_deg: float
    trans_sd_mm: float
    knot_interval: float  # slices between control transforms
    jump_rate: float = 0.0  # expected abrupt jumps per slice
    jump_rot_sd_deg: float = 0.0
    jump_trans_sd_mm: float = 0.0
    uniform: bool = False  # controls ~ U[-a, a] per component (sweep levels), else N(0, sd)


MOTION_LEVELS: dict[str, MotionLevel | None] = {
    "none": None,
    "mild": MotionLevel(rot_sd_deg=1.0, trans_sd_mm=0.75, knot_interval=8),
    "moderate": MotionLevel(rot_sd_deg=3.0, trans_sd_mm=2.0, knot_interval=6),
    "severe": MotionLevel(rot_sd_deg=6.0, trans_sd_mm=4.0, knot_interval=4,
                          jump_rate=1 / 20, jump_rot_sd_deg=5.0, jump_trans_sd_mm=3.0),
    "csvr": None,  # sampled by _sample_csvr_stack (its own distribution)
}

SWEEP_KNOT_INTERVAL = 6  # slices between control transforms of the rot<A> / trans<T> sweep levels
_SWEEP = re.compile(r"^(rot|trans)(\d+(?:\.\d+)?)$")


def motion_level(name: str) -> MotionLevel | None:
    """The amplitudes of a named level or a sweep level ``rot<A>`` / ``trans<T>`` (module doc);
    ``None`` for ``none`` and ``csvr`` (which has its own sampler).

    Raises:
        Slice2VolError: for an unknown name.

    >>> motion_level("rot20").rot_sd_deg, motion_level("rot20").trans_sd_mm
    (20.0, 0.0)
    """
    if name in MOTION_LEVELS:
        return MOTION_LEVELS[name]
    m = _SWEEP.match(name)
    if m is None:
        raise Slice2VolError(f"unknown motion level {name!r} (use one of {', '.join(MOTION_LEVELS)}, "
                             "or rot<degrees> / trans<mm> for a magnitude sweep, e.g. rot20, trans10)")
    a = float(m.group(2))
    if m.group(1) == "rot":
        return MotionLevel(rot_sd_deg=a, trans_sd_mm=0.0, knot_interval=SWEEP_KNOT_INTERVAL, uniform=True)
    return MotionLevel(rot_sd_deg=0.0, trans_sd_mm=a, knot_interval=SWEEP_KNOT_INTERVAL, uniform=True)


# cSVR paper, "Training": bulk in-plane rotation U[-12, 12] deg, 1..100 B-spline perturbations,
# rotation ~ N(0, 20 deg), translation ~ U[-6.1, 6.1] mm.
CSVR_BULK_DEG = 12.0
CSVR_ROT_SD_DEG = 20.0
CSVR_TRANS_MM = 6.1
CSVR_MAX_PERTURBATIONS = 100


@dataclass
class StackMotion:
    """Sampled motion of one stack (all lists, so it is JSON-ready).

    Attributes:
        knot_times: ``(K,)`` global acquisition times of the control transforms.
        control: ``(K, 6)`` control parameters (rotation vector rad, translation mm).
        bulk: ``(6,)`` bulk transform of the whole stack, applied before the trajectory.
        jump_times: ``(J,)`` times of abrupt jumps.
        jumps: ``(J, 6)`` parameter steps added for ``t >= jump_times[j]``.
    """

    knot_times: list[float]
    control: list[list[float]]
    bulk: list[float] = field(default_factory=lambda: [0.0] * 6)
    jump_times: list[float] = field(default_factory=list)
    jumps: list[list[float]] = field(default_factory=list)


@dataclass
class MotionParams:
    """Everything random about the motion of a simulation.

    Attributes:
        level: the level it was sampled from (informative only).
        centre: ``(3,)`` world mm, the rotation centre (brain centre).
        stacks: one :class:`StackMotion` per stack; empty for level ``none``.
    """

    level: str
    centre: list[float]
    stacks: list[StackMotion] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MotionParams":
        return cls(level=d["level"], centre=list(d["centre"]), stacks=[StackMotion(**s) for s in d["stacks"]])


# ----------------------------------------------------------------------------- sampling (random)


def _knot_times(times: np.ndarray, k: int) -> np.ndarray:
    """``k`` equally spaced times spanning a stack's acquisition (a one-slice stack spans 1 unit)."""
    t0, t1 = float(times.min()), float(times.max())
    return np.linspace(t0, max(t1, t0 + 1.0), k)


def _sample_level_stack(level: MotionLevel, times: np.ndarray, rng: np.random.Generator) -> StackMotion:
    n = len(times)
    k = max(2, int(math.ceil(max(n - 1, 1) / level.knot_interval)) + 1)
    sd = np.array([math.radians(level.rot_sd_deg)] * 3 + [level.trans_sd_mm] * 3)
    control = (rng.uniform(-1.0, 1.0, size=(k, 6)) if level.uniform else rng.normal(size=(k, 6))) * sd
    n_jumps = int(rng.poisson(level.jump_rate * n)) if level.jump_rate > 0 else 0
    t0, t1 = float(times.min()), float(times.max())
    jump_times = np.sort(rng.uniform(t0, max(t1, t0 + 1.0), n_jumps))
    jsd = np.array([math.radians(level.jump_rot_sd_deg)] * 3 + [level.jump_trans_sd_mm] * 3)
    jumps = rng.normal(size=(n_jumps, 6)) * jsd
    return StackMotion(_knot_times(times, k).tolist(), control.tolist(), [0.0] * 6,
                       jump_times.tolist(), jumps.tolist())


def _sample_csvr_stack(times: np.ndarray, normal: np.ndarray, rng: np.random.Generator) -> StackMotion:
    k = int(rng.integers(1, CSVR_MAX_PERTURBATIONS + 1))
    rot = rng.normal(scale=math.radians(CSVR_ROT_SD_DEG), size=(k, 3))
    trans = rng.uniform(-CSVR_TRANS_MM, CSVR_TRANS_MM, size=(k, 3))
    # The bulk rotation turns the stack within its own plane (about its normal): imperfect
    # planning of the in-plane orientation, unknown to the reconstruction.
    angle = math.radians(rng.uniform(-CSVR_BULK_DEG, CSVR_BULK_DEG))
    n = np.asarray(normal, dtype=np.float64)
    bulk = np.concatenate([n / np.linalg.norm(n) * angle, np.zeros(3)])
    return StackMotion(_knot_times(times, k).tolist(), np.concatenate([rot, trans], 1).tolist(), bulk.tolist())


def sample_motion(
    level: str,
    stack_times: Sequence[np.ndarray],
    normals: Sequence[np.ndarray],
    centre: np.ndarray,
    rng: np.random.Generator,
) -> MotionParams:
    """Draw the motion parameters of a simulation (the only random step).

    Args:
        level: ``none``, ``mild``, ``moderate``, ``severe``, ``csvr`` or a sweep level (``rot20``).
        stack_times: per stack, ``(N_s,)`` global acquisition times of its slices.
        normals: per stack, ``(3,)`` world direction of the slice normal (used by ``csvr``).
        centre: ``(3,)`` world mm, brain centre (rotation centre).
        rng: numpy generator.
    """
    amplitudes = motion_level(level)
    params = MotionParams(level, [float(x) for x in np.asarray(centre, dtype=np.float64)])
    if level == "none":
        return params
    for times, normal in zip(stack_times, normals):
        times = np.asarray(times, dtype=np.float64)
        if level == "csvr":
            params.stacks.append(_sample_csvr_stack(times, normal, rng))
        else:
            params.stacks.append(_sample_level_stack(amplitudes, times, rng))  # type: ignore[arg-type]
    return params


# ----------------------------------------------------------------------- application (deterministic)


def trajectory_params(motion: StackMotion, times: np.ndarray) -> np.ndarray:
    """Trajectory parameters ``p(t) + jumps`` at ``times`` ``(T,)`` -> ``(T, 6)`` (rad, mm)."""
    t = np.asarray(times, dtype=np.float64)
    knots = np.asarray(motion.knot_times, dtype=np.float64)
    control = np.asarray(motion.control, dtype=np.float64).reshape(-1, 6)
    if len(knots) == 1:
        p = np.repeat(control, len(t), 0)
    else:
        p = make_interp_spline(knots, control, k=min(3, len(knots) - 1))(t)
    for tau, d in zip(motion.jump_times, motion.jumps):
        p = p + (t >= tau)[:, None] * np.asarray(d, dtype=np.float64)
    return p


def motion_matrices(params: MotionParams, stack: int, times: np.ndarray) -> np.ndarray:
    """World motion ``M_s(t)`` of stack ``stack`` at ``times`` ``(T,)`` -> ``(T, 4, 4)`` float64."""
    t = np.asarray(times, dtype=np.float64)
    if not params.stacks:
        return np.tile(np.eye(4), (len(t), 1, 1))
    m = params.stacks[stack]
    c = torch.tensor(params.centre, dtype=torch.float64)
    traj = rotation_about(torch.from_numpy(trajectory_params(m, t)), c.expand(len(t), 3))
    bulk = rotation_about(torch.tensor(m.bulk, dtype=torch.float64), c)
    return (traj @ bulk).numpy()


def apply_motion(params: MotionParams, nominal: Sequence[np.ndarray], times: Sequence[np.ndarray]) -> list[np.ndarray]:
    """True slice poses ``M_s(t_n) @ nominal_n`` per stack.

    Args:
        params: sampled motion (level ``none``/no stacks: the nominal poses are returned, copied).
        nominal: per stack ``(N_s, 4, 4)`` nominal slice-to-world poses.
        times: per stack ``(N_s,)`` global acquisition times.
    Returns:
        per stack ``(N_s, 4, 4)`` float64 true poses.
    """
    if params.stacks and len(params.stacks) != len(nominal):
        raise Slice2VolError(f"motion parameters describe {len(params.stacks)} stacks, but {len(nominal)} were given")
    out = []
    for s, (P, t) in enumerate(zip(nominal, times)):
        P = np.asarray(P, dtype=np.float64)
        out.append(P.copy() if not params.stacks else motion_matrices(params, s, t) @ P)
    return out
