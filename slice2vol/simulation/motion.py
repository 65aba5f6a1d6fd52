"""Rigid fetal-head motion over acquisition time, for simulation.

Design (after TorchIO's random transforms): a *random* sampler (:func:`sample_motion`) draws every
random number up front into a small JSON-serialisable :class:`MotionParams`; a *deterministic*
function (:func:`apply_motion`) turns parameters into poses.  A simulation is therefore fully
described, and exactly reproducible, from its recorded parameters.

Model.  Time is the global acquisition index of a slice (one unit per slice, stacks acquired one
after another).  Each stack ``s`` has its own trajectory, because stacks are separate scans with
a pause between them during which the fetus moves freely.  The motion of stack ``s`` at time
``t`` is the rigid world transform (rotation about the brain centre ``c``, see
:func:`slice2vol.core.transforms.rotation_about`)::

    M_s(t) = Rc(p_s(t) + sum_{j: t >= tau_j} d_j) @ Rc(b_s)

* ``b_s``: a bulk transform of the whole stack (6 parameters; the cSVR "imperfect plane
  selection", an in-plane rotation about the stack normal; zero for the other levels);
* ``p_s(t)``: a cubic B-spline *interpolating* ``K`` randomly sampled control parameter vectors
  ``(rx, ry, rz, tx, ty, tz)`` (rad, mm) at ``K`` equally spaced times across the stack's
  acquisition (degree ``min(3, K - 1)`` when ``K < 4``, constant for ``K = 1``);
* ``d_j``: abrupt jumps (steps that persist) at random times ``tau_j`` (levels ``severe`` and
  ``extreme``).

Trajectory kinds (:attr:`StackMotion.kind`).  ``"spline"`` is the B-spline ``p_s(t)`` above (every
level but ``extreme``).  ``"walk"`` (level ``extreme``, :data:`WALK_LEVELS`) replaces it by a
bounded random walk over the stack's acquisition times: ``x_0`` from the walk's stationary
distribution, ``x_{n+1} = (1 - r) x_n + e_n`` with Gaussian per-slice increments ``e_n`` and a mild
mean reversion ``r`` toward the per-stack offset ``b_s`` (now a random bulk rotation +
translation, the stack's own mean pose), plus Poisson-timed lasting jumps ``d_j``.  The sampled
state at every acquisition time is recorded (``walk_times``, ``walk``), so poses are reproduced
exactly from the JSON parameters; parameters written before ``kind`` existed load as splines.

The true pose of slice ``n`` of stack ``s`` is ``M_s(t_n) @ nominal_n``: the slice plane moves
relative to the anatomy, which is what a reconstruction has to undo.

A **turn** (:func:`add_turn`, ``slice2vol simulate --turn DEG``) adds to any level one lasting jump
of ``DEG`` degrees about a random axis through the brain centre, in one random stack, at a random
time in the middle 40 % of its acquisition: an active fetus turning over during a stack, which
none of the levels produces (``extreme``'s jumps have a 6 deg sd per component).  It is recorded
in :attr:`MotionParams.turn` and as a jump of that stack; like every jump it adds to the
trajectory's rotation vector, so the slices turn by exactly ``DEG`` only where the stack does not
otherwise move (at ``moderate`` motion within about 10 deg of it).

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
extreme   walk: step  step 0.8,     random walk,   per-stack offset rot sd 5 deg, trans sd 3 mm;
          3.0, mean   stationary    no knots       Poisson(1 per 10 slices) lasting jumps of
          reversion   sd ~1.5                      rot sd 6 deg, trans sd 2.5 mm; benchmarks add
          15 %/slice,                              random 1..4 interleave packages and stack
          stat. ~5.7                               tilts up to 15 deg (``simulate.realism_for``)
========  ==========  ============  =============  ==========================================

``extreme`` is calibrated on an independent simulator's severe case (per-slice rotation about the
brain centre median 14 deg, p90 24 deg, max 33 deg; translations up to ~15 mm; abrupt jumps;
interleaved, tilted stacks), on which every method failed.  Measured motion of each level
(:func:`motion_statistics`: true vs nominal slice pose; "step" = between consecutive
acquisitions of a stack), 3 training atlases x 4 seeds x 3 orthogonal 1 mm x 3 mm stacks::

    $ python benchmarks/motion_levels.py        # -> benchmarks/results/motion_levels.txt
    level     rotation deg          slice-centre shift mm  transl. at centre mm  step rotation deg    within-stack rot deg
              p10  p50  p90  max    p10  p50  p90  max     p10  p50  p90  max    p10  p50  p90  max   p10  p50  p90  max
    mild      0.8  1.4  2.5  3.5    0.5  1.2  2.1  4.0     0.5  1.0  1.7  2.9    0.1  0.3  0.6  1.7   0.7  1.3  2.1  3.5
    moderate  2.3  4.4  7.3 10.5    1.6  3.3  6.2 11.2     1.3  2.8  4.6  7.8    0.6  1.3  2.3  5.8   2.1  4.1  6.7 11.2
    severe    4.7 10.3 20.6 41.5    3.6  8.5 15.9 54.5     3.2  7.0 12.8 21.7    1.7  3.8  7.0 23.2   4.4  8.7 15.7 29.1
    extreme   7.2 15.4 28.5 63.8    4.2  9.3 18.2 57.4     3.1  6.8 12.8 21.3    2.4  5.0  8.8 24.9   4.5  9.3 16.6 33.6
    csvr     14.6 28.0 47.4 74.4    4.5 10.0 24.2 65.6     3.1  5.6  8.0 10.0   11.3 35.7 60.1 118.4 14.3 26.7 45.5 76.4

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

from slice2vol.core.transforms import rotation_about
from slice2vol.errors import Slice2VolError

__all__ = [
    "MotionLevel",
    "MOTION_LEVELS",
    "motion_level",
    "CSVR_BULK_DEG",
    "CSVR_ROT_SD_DEG",
    "CSVR_TRANS_MM",
    "CSVR_MAX_PERTURBATIONS",
    "WalkLevel",
    "WALK_LEVELS",
    "StackMotion",
    "MotionParams",
    "sample_motion",
    "add_turn",
    "trajectory_params",
    "motion_matrices",
    "apply_motion",
    "motion_statistics",
    "motion_values",
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


@dataclass(frozen=True)
class WalkLevel:
    """Amplitudes of a random-walk level (``kind = "walk"``, see the module doc; all per
    component, angles in degrees, lengths in mm, rates per slice of acquisition time)."""

    step_rot_deg: float  # sd of the per-slice Gaussian increment
    step_trans_mm: float
    reversion: float  # fraction of the deviation from the stack offset undone per slice
    bulk_rot_deg: float  # sd of the per-stack offset (bulk rigid transform)
    bulk_trans_mm: float
    jump_rate: float  # Poisson rate of abrupt lasting jumps
    jump_rot_deg: float
    jump_trans_mm: float

    def stationary_sd(self) -> tuple[float, float]:
        """Stationary sd (deg, mm) of the walk around the stack offset (AR(1) process)."""
        f = 1.0 / math.sqrt(1.0 - (1.0 - self.reversion) ** 2)
        return self.step_rot_deg * f, self.step_trans_mm * f


MOTION_LEVELS: dict[str, MotionLevel | None] = {
    "none": None,
    "mild": MotionLevel(rot_sd_deg=1.0, trans_sd_mm=0.75, knot_interval=8),
    "moderate": MotionLevel(rot_sd_deg=3.0, trans_sd_mm=2.0, knot_interval=6),
    "severe": MotionLevel(rot_sd_deg=6.0, trans_sd_mm=4.0, knot_interval=4,
                          jump_rate=1 / 20, jump_rot_sd_deg=5.0, jump_trans_sd_mm=3.0),
    "csvr": None,  # sampled by _sample_csvr_stack (its own distribution)
    "extreme": None,  # sampled by _sample_walk_stack with WALK_LEVELS["extreme"]
}

#: Random-walk levels (``kind = "walk"``), calibrated with ``benchmarks/motion_levels.py``.
WALK_LEVELS: dict[str, WalkLevel] = {
    # Recalibrated after the first measurements: with slow steps (1.5 deg, 5 % reversion) and a
    # large per-stack offset (7 deg) most of the motion was a per-stack rigid offset, which stack
    # registration removes, and classical SVR passed it easily (within-stack rotation p50 7 deg,
    # below ``severe``'s 8.7).  Faster steps and jumps put the difficulty inside the stacks.
    "extreme": WalkLevel(step_rot_deg=3.0, step_trans_mm=0.8, reversion=0.15, bulk_rot_deg=5.0,
                         bulk_trans_mm=3.0, jump_rate=1 / 10, jump_rot_deg=6.0, jump_trans_mm=2.5),
}

SWEEP_KNOT_INTERVAL = 6  # slices between control transforms of the rot<A> / trans<T> sweep levels
_SWEEP = re.compile(r"^(rot|trans)(\d+(?:\.\d+)?)$")


def motion_level(name: str) -> MotionLevel | None:
    """The amplitudes of a named level or a sweep level ``rot<A>`` / ``trans<T>`` (module doc);
    ``None`` for ``none``, ``csvr`` and the random-walk levels (``extreme``; see
    :data:`WALK_LEVELS`), which have their own samplers.

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
        kind: ``"spline"`` (``knot_times``/``control`` are B-spline control transforms) or
            ``"walk"`` (a random walk: ``walk_times`` ``(T,)`` sorted acquisition times and
            ``walk`` ``(T, 6)`` its state there, linearly interpolated between them and held
            constant outside; ``knot_times``/``control`` are then empty).
        walk_times, walk: see ``kind``; empty for ``"spline"``.
    """

    knot_times: list[float]
    control: list[list[float]]
    bulk: list[float] = field(default_factory=lambda: [0.0] * 6)
    jump_times: list[float] = field(default_factory=list)
    jumps: list[list[float]] = field(default_factory=list)
    kind: str = "spline"
    walk_times: list[float] = field(default_factory=list)
    walk: list[list[float]] = field(default_factory=list)


@dataclass
class MotionParams:
    """Everything random about the motion of a simulation.

    Attributes:
        level: the level it was sampled from (informative only).
        centre: ``(3,)`` world mm, the rotation centre (brain centre).
        stacks: one :class:`StackMotion` per stack; empty for level ``none`` without a turn.
        turn: ``{}`` or, after :func:`add_turn`, ``{"stack", "time", "angle_deg", "axis"}``.
    """

    level: str
    centre: list[float]
    stacks: list[StackMotion] = field(default_factory=list)
    turn: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MotionParams":
        return cls(level=d["level"], centre=list(d["centre"]), stacks=[StackMotion(**s) for s in d["stacks"]],
                   turn=dict(d.get("turn", {})))


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


def _sample_walk_stack(level: WalkLevel, times: np.ndarray, rng: np.random.Generator) -> StackMotion:
    """A bounded random walk with lasting jumps around a per-stack offset (module doc)."""
    t = np.unique(np.asarray(times, dtype=np.float64))  # sorted acquisition times
    n = len(t)
    deg, mm = math.radians(1.0), 1.0
    scale = lambda r, x: np.array([r * deg] * 3 + [x * mm] * 3)  # noqa: E731
    bulk = rng.normal(size=6) * scale(level.bulk_rot_deg, level.bulk_trans_mm)
    rot_sd, trans_sd = level.stationary_sd()
    x = rng.normal(size=6) * scale(rot_sd, trans_sd)  # start in the stationary distribution
    steps = rng.normal(size=(n, 6)) * scale(level.step_rot_deg, level.step_trans_mm)
    walk = np.empty((n, 6))
    for i in range(n):
        if i:
            x = (1.0 - level.reversion) ** (t[i] - t[i - 1]) * x + steps[i]
        walk[i] = x
    n_jumps = int(rng.poisson(level.jump_rate * n))
    t0, t1 = float(t[0]), float(t[-1])
    jump_times = np.sort(rng.uniform(t0, max(t1, t0 + 1.0), n_jumps))
    jumps = rng.normal(size=(n_jumps, 6)) * scale(level.jump_rot_deg, level.jump_trans_mm)
    return StackMotion([], [], bulk.tolist(), jump_times.tolist(), jumps.tolist(),
                       kind="walk", walk_times=t.tolist(), walk=walk.tolist())


def sample_motion(
    level: str,
    stack_times: Sequence[np.ndarray],
    normals: Sequence[np.ndarray],
    centre: np.ndarray,
    rng: np.random.Generator,
) -> MotionParams:
    """Draw the motion parameters of a simulation (the only random step).

    Args:
        level: ``none``, ``mild``, ``moderate``, ``severe``, ``extreme``, ``csvr`` or a sweep
            level (``rot20``).
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
        elif level in WALK_LEVELS:
            params.stacks.append(_sample_walk_stack(WALK_LEVELS[level], times, rng))
        else:
            params.stacks.append(_sample_level_stack(amplitudes, times, rng))  # type: ignore[arg-type]
    return params


def add_turn(params: MotionParams, stack_times: Sequence[np.ndarray], angle_deg: float,
             rng: np.random.Generator) -> MotionParams:
    """Add a lasting turn of the fetus (module doc) to sampled motion, in place.

    One stack ``s`` (uniform), a time ``tau`` at a uniform quantile in [0.3, 0.7] of its acquisition
    times, a uniform random axis; the rotation of ``angle_deg`` about the brain centre is added as
    a jump of stack ``s`` from ``tau`` on.  Level ``none`` gets still trajectories first.

    Args:
        params: from :func:`sample_motion`; stack_times: per stack ``(N_s,)`` acquisition times.
        angle_deg: the turn, degrees (0 < angle <= 180).
        rng: numpy generator (drawn after everything else, so a seed's other draws do not change).
    Returns:
        ``params``, with :attr:`MotionParams.turn` set.
    """
    if not (math.isfinite(angle_deg) and 0 < angle_deg <= 180):
        raise Slice2VolError(f"a turn must be between 0 and 180 degrees, got {angle_deg}")
    if not params.stacks:
        params.stacks = [StackMotion([float(np.min(t))], [[0.0] * 6]) for t in stack_times]
    s = int(rng.integers(len(stack_times)))
    tau = float(np.quantile(np.asarray(stack_times[s], dtype=np.float64), rng.uniform(0.3, 0.7)))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    m = params.stacks[s]
    m.jump_times = list(m.jump_times) + [tau]
    m.jumps = list(m.jumps) + [(axis * math.radians(angle_deg)).tolist() + [0.0, 0.0, 0.0]]
    params.turn = {"stack": s, "time": tau, "angle_deg": float(angle_deg), "axis": axis.tolist()}
    return params


# ----------------------------------------------------------------------- application (deterministic)


def trajectory_params(motion: StackMotion, times: np.ndarray) -> np.ndarray:
    """Trajectory parameters ``p(t) + jumps`` at ``times`` ``(T,)`` -> ``(T, 6)`` (rad, mm)."""
    t = np.asarray(times, dtype=np.float64)
    if motion.kind == "walk":
        wt = np.asarray(motion.walk_times, dtype=np.float64)
        w = np.asarray(motion.walk, dtype=np.float64).reshape(-1, 6)
        p = np.stack([np.interp(t, wt, w[:, c]) for c in range(6)], 1) if len(wt) else np.zeros((len(t), 6))
        for tau, d in zip(motion.jump_times, motion.jumps):
            p = p + (t >= tau)[:, None] * np.asarray(d, dtype=np.float64)
        return p
    if motion.kind != "spline":
        raise Slice2VolError(f"unknown motion trajectory kind {motion.kind!r} (expected 'spline' or 'walk')")
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


# ------------------------------------------------------------------------------------ statistics

STAT_PERCENTILES = (10, 50, 90)


def percentiles(x: np.ndarray) -> dict:
    """``{"p10", "p50", "p90", "max"}`` of ``x`` (NaN when empty)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {f"p{q}": float("nan") for q in STAT_PERCENTILES} | {"max": float("nan")}
    return {f"p{q}": float(np.percentile(x, q)) for q in STAT_PERCENTILES} | {"max": float(x.max())}


def _angles_deg(R: np.ndarray) -> np.ndarray:
    c = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def motion_values(true_poses: Sequence[np.ndarray], nominal_poses: Sequence[np.ndarray],
                  centre: Sequence[float], times: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The per-slice values behind :func:`motion_statistics` (same arguments), as arrays (the
    ``step_*`` ones have one value fewer per stack); pool several cases by concatenating them."""
    c = np.asarray(centre, dtype=np.float64)
    rot, disp, trans, srot, sdisp, wrot = [], [], [], [], [], []
    for s, (T, P) in enumerate(zip(true_poses, nominal_poses)):
        T = np.asarray(T, dtype=np.float64)
        P = np.asarray(P, dtype=np.float64)
        M = T @ np.linalg.inv(P)
        rot.append(_angles_deg(M[:, :3, :3]))
        # the stack's mean rotation (chordal mean: the average matrix projected onto SO(3)), which a
        # rigid stack registration can remove; what is left each slice must be found on its own
        u, _, vt = np.linalg.svd(M[:, :3, :3].mean(0))
        mean = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
        wrot.append(_angles_deg(M[:, :3, :3] @ mean.T))
        disp.append(np.linalg.norm(T[:, :3, 3] - P[:, :3, 3], axis=1))
        trans.append(np.linalg.norm(M[:, :3, :3] @ c + M[:, :3, 3] - c, axis=1))
        order = np.argsort(np.asarray(times[s]), kind="stable") if times is not None else np.arange(len(T))
        a, b = order[:-1], order[1:]
        D = M[b] @ np.linalg.inv(M[a])
        srot.append(_angles_deg(D[:, :3, :3]))
        x = np.concatenate([P[b, :3, 3], np.ones((len(b), 1))], 1)
        sdisp.append(np.linalg.norm(np.einsum("nij,nj->ni", M[b] - M[a], x)[:, :3], axis=1))
    cat = lambda v: np.concatenate(v) if v else np.zeros(0)  # noqa: E731
    return {"rotation_deg": cat(rot), "displacement_mm": cat(disp), "translation_mm": cat(trans),
            "step_rotation_deg": cat(srot), "step_displacement_mm": cat(sdisp),
            "within_stack_rotation_deg": cat(wrot)}


def motion_statistics(true_poses: Sequence[np.ndarray], nominal_poses: Sequence[np.ndarray],
                      centre: Sequence[float], times: Sequence[np.ndarray] | None = None) -> dict:
    """How far the true slice poses are from the nominal ones, and how abruptly they change.

    Per slice, the motion is ``M = true @ inv(nominal)`` (a world rigid transform).  Reported, as
    ``{"p10", "p50", "p90", "max"}`` dicts over all slices of all stacks:

    * ``rotation_deg``: the rotation angle of ``M`` (the same about any centre);
    * ``displacement_mm``: how far the slice centre moved, ``|true[:3, 3] - nominal[:3, 3]|``
      (includes the swing of the rotation about the brain centre);
    * ``translation_mm``: ``|M(c) - c|``, the translation of the motion about the brain centre ``c``;
    * ``within_stack_rotation_deg``: the angle of ``M`` relative to its stack's mean rotation, the
      part a rigid stack-to-stack registration cannot remove;
    * ``step_rotation_deg`` / ``step_displacement_mm``: between consecutive acquisitions of a
      stack (by ``times``, else by slice index), the angle of ``M_next @ inv(M_prev)`` and
      ``|M_next(x) - M_prev(x)|`` at the next slice's nominal centre ``x``: the error of assuming
      a slice moved as the one acquired just before it.

    Args:
        true_poses, nominal_poses: per stack ``(N_s, 4, 4)`` slice-to-world poses.
        centre: ``(3,)`` world mm, the brain centre.
        times: optional per stack ``(N_s,)`` acquisition times.
    Returns:
        the dict above, plus ``"slices"``: the number of slices.
    """
    values = motion_values(true_poses, nominal_poses, centre, times)
    return {"slices": int(len(values["rotation_deg"]))} | {k: percentiles(v) for k, v in values.items()}
