"""Simulate motion-corrupted stacks of thick slices from a ground-truth volume.

Pipeline (each step a small function; geometry conventions of :mod:`slice2vol.core.geometry`):

1. **Geometry.**  Stacks are oriented relative to the world (RAS) axes: ``axial`` slices are
   perpendicular to S, ``coronal`` to A, ``sagittal`` to R, and ``oblique`` is one of those
   (chosen at random) tilted by ``tilt`` degrees about a random in-plane axis.  With
   ``stack_tilt_max > 0`` every stack's plane is then tilted once more, by ``U[0, stack_tilt_max]``
   degrees about a random axis in its (possibly oblique) plane: scanner planes are planned on a
   moving fetus and are never exactly orthogonal to the anatomy.  The field of view
   is centred on the brain (mask centroid) and covers the mask plus ``margin`` mm along every
   stack axis.  The affine is rounded to float32, the precision of the NIfTI sform, so the
   nominal poses recorded here are exactly those :func:`slice2vol.io.load_stack` reads back.
2. **Acquisition order.**  Interleaved with ``interleave`` packages (``2``: even slices then odd),
   SVRTK's ``-packages`` convention: slice ``k`` belongs to package ``k % p``, packages are acquired
   one after another (package 0 first) and each in increasing ``k``.  ``interleave = 0`` draws
   ``p`` uniformly in 1..4 per stack (recorded in :attr:`StackGeometry.interleave`).  Stacks are
   acquired one after another; a slice's global time is its stack's offset plus its order.
3. **Motion.**  :mod:`slice2vol.simulation.motion`: true pose = ``M_s(t) @ nominal``; optionally
   a lasting ``turn`` of the fetus during one stack (:func:`slice2vol.simulation.motion.add_turn`).
4. **Rendering.**  :func:`slice2vol.core.acquisition.forward` with the slice profile's PSF
   (:func:`slice_psf`: by default ``psf_kernel(..., quality="high")``, the reconstruction's Gaussian
   model with every part in explicit nodes; ``profile="box"`` a rectangular slab and pixel)
   at the true poses.  Pixels whose PSF cannot reach a non-zero voxel are skipped (their value is
   exactly 0), which makes skull-stripped volumes several times faster to simulate.  Stack masks:
   the ground-truth mask through the same geometry with the thin PSF, thresholded at 0.5.
5. **Artefacts** (applied in the order of the physics): optionally signal loss in a fraction of
   the slices (:func:`signal_loss_field`: the dark slices and bands that motion *during* a
   single-shot fast spin echo slice leaves), Rician noise (magnitude of complex
   Gaussian noise, sd relative to the mean brain intensity), a smooth multiplicative bias field
   (it scales signal and thermal noise alike, as a receive coil does), optionally a slice-wise
   bias field, negatives clipped to 0, then a random gamma change ``I -> max * (I / max)^gamma``.

Like TorchIO's random transforms, all randomness is drawn by :func:`sample_simulation_params` into
a JSON-serialisable :class:`SimulationParams`; :func:`apply_simulation` is deterministic and
:func:`simulate_stacks` is the two together.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slice2vol import __version__
from slice2vol.core.acquisition import PSF, forward, psf_kernel
from slice2vol.core.geometry import check_affine, slice_pixel_coords, stack_slice_poses
from slice2vol.core.image import Stack, Volume
from slice2vol.core.inplane import fourier_resize
from slice2vol.core.runtime import resolve_device, seed_everything
from slice2vol.core.transforms import axis_angle_to_matrix
from slice2vol.errors import Slice2VolError
from slice2vol.io import load_volume, poses_to_json, save_stack, save_volume, write_json
from slice2vol.simulation.motion import MotionParams, add_turn, apply_motion, motion_level, sample_motion

__all__ = [
    "ORIENTATIONS",
    "SimulationConfig",
    "StackGeometry",
    "ArtefactParams",
    "SimulationParams",
    "SimulationResult",
    "interleaved_order",
    "realism_for",
    "orientation_rotation",
    "stack_affine",
    "sample_simulation_params",
    "apply_simulation",
    "simulate_stacks",
    "render_stack",
    "slice_psf",
    "PROFILES",
    "signal_loss_field",
    "save_simulation",
    "config_from_args",
    "simulate_command",
]

log = logging.getLogger(__name__)

ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")
PROFILES = ("gaussian", "box")  # slice profiles the simulator renders with (slice_psf)
_BASE_ORIENTATIONS = ORIENTATIONS[:3]

# Columns are the stack's voxel axes (i, j, k) in world RAS; each is a proper rotation so the
# stack affine is right-handed and load_stack never flips it.
_AXES = {
    "axial": np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]),  # i=R, j=A, k=S
    "coronal": np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),  # i=R, j=S, k=P
    "sagittal": np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]),  # i=A, j=S, k=R
}

RENDER_CHUNK = 1 << 15  # pixels per forward() chunk: fastest on small CPU caches in our tests
_PROGRESS_SAMPLES = 3e7  # PSF samples above which rendering takes seconds: show a progress bar
_SLICE_BIAS_TERMS = 6  # 1, u, v, u^2, uv, v^2
MAX_PACKAGES = 4  # interleave = 0 draws 1..MAX_PACKAGES packages per stack
#: Geometry settings of benchmarks simulating the ``extreme`` motion level (:func:`realism_for`).
EXTREME_REALISM = {"interleave": 0, "stack_tilt_max": 15.0}


@dataclass
class SimulationConfig:
    """Scientific parameters of a simulation (lengths in mm, angles in degrees).

    Attributes:
        n_stacks: number of stacks.
        orientations: one of :data:`ORIENTATIONS` per stack; ``None`` cycles
            axial, coronal, sagittal, oblique.
        spacing: in-plane pixel spacing.
        thickness: slice thickness (through-plane PSF FWHM).
        gap: gap between slices; slice spacing = thickness + gap (negative: overlapping slices).
        margin: field of view beyond the mask along every stack axis.
        tilt: tilt of ``oblique`` stacks.
        interleave: number of interleave packages of the acquisition order (1: sequential; 0:
            random in 1..4 per stack), see :func:`interleaved_order`.
        stack_tilt_max: every stack's plane is tilted by ``U[0, stack_tilt_max]`` degrees about a
            random in-plane axis (0: no extra tilt, the stacks as requested).
        motion: motion level, see :mod:`slice2vol.simulation.motion`.
        noise: Rician noise sd relative to the mean intensity inside the mask.
        bias: maximum |log| of the smooth per-stack bias field (0.2: factors 0.82..1.22).
        bias_order: polynomial order of the per-stack bias field.
        slice_bias: maximum |log| of an extra per-slice in-plane quadratic bias field.
        gamma: sd of ``log(gamma)`` of the per-stack gamma change.
        signal_loss: fraction of every stack's slices with motion-induced signal loss
            (:func:`signal_loss_field`; 0: none).
        turn: a lasting turn of the fetus by this many degrees during one random stack, on top of
            ``motion`` (:func:`slice2vol.simulation.motion.add_turn`; 0: none).
        profile: the PSF the slices are rendered with, one of :data:`PROFILES` (:func:`slice_psf`):
            ``"gaussian"`` is the reconstruction's model (finer quadrature); ``"box"`` a rectangular
            slab ``thickness`` wide and a pixel-wide box in-plane -- a sharper, differently shaped
            PSF, so that reconstructions are also tested against a slice profile they do not model.
        zero_fill: the scanner's in-plane interpolation: slices are acquired (rendered, with noise)
            at ``spacing`` and stored on a grid ``zero_fill`` times finer by zero filling their 2D
            spectrum (:func:`zero_fill_stack`; 1: stored as acquired).  Siemens' "interpolation" and
            GE's "ZIP" store 2.
    """

    n_stacks: int = 3
    orientations: Sequence[str] | None = None
    spacing: float = 1.0
    thickness: float = 3.0
    gap: float = 0.0
    margin: float = 10.0
    tilt: float = 15.0
    interleave: int = 2
    motion: str = "moderate"
    noise: float = 0.02
    bias: float = 0.0
    bias_order: int = 3
    slice_bias: float = 0.0
    gamma: float = 0.0
    stack_tilt_max: float = 0.0
    signal_loss: float = 0.0
    turn: float = 0.0
    profile: str = "gaussian"
    zero_fill: int = 1

    def stack_orientations(self) -> list[str]:
        if self.orientations is None:
            return [ORIENTATIONS[s % len(ORIENTATIONS)] for s in range(self.n_stacks)]
        return [str(o).lower() for o in self.orientations]

    def validate(self) -> None:
        """Raise :class:`Slice2VolError` (one sentence) for an impossible configuration."""
        if self.n_stacks < 1:
            raise Slice2VolError(f"the number of stacks must be at least 1, got {self.n_stacks}")
        names = self.stack_orientations()
        if len(names) != self.n_stacks:
            raise Slice2VolError(
                f"{len(names)} orientations were given for {self.n_stacks} stacks; give exactly one per stack")
        for o in names:
            if o not in ORIENTATIONS:
                raise Slice2VolError(f"unknown orientation {o!r} (use {', '.join(ORIENTATIONS)})")
        for what, v in (("spacing", self.spacing), ("thickness", self.thickness)):
            if not (math.isfinite(v) and v > 0):
                raise Slice2VolError(f"{what} must be a positive number of mm, got {v}")
        if not (math.isfinite(self.gap) and self.thickness + self.gap > 0):
            raise Slice2VolError(f"gap {self.gap} mm leaves no positive slice spacing (thickness + gap)")
        for what, v in (("margin", self.margin), ("noise", self.noise), ("bias", self.bias),
                        ("slice bias", self.slice_bias), ("gamma", self.gamma)):
            if not (math.isfinite(v) and v >= 0):
                raise Slice2VolError(f"{what} must be a non-negative number, got {v}")
        if not math.isfinite(self.tilt):
            raise Slice2VolError(f"tilt must be a finite angle, got {self.tilt}")
        if self.interleave < 0:
            raise Slice2VolError(f"interleave packages must be at least 1 (or 0: random in 1..{MAX_PACKAGES}), "
                                 f"got {self.interleave}")
        if not (math.isfinite(self.stack_tilt_max) and 0 <= self.stack_tilt_max <= 90):
            raise Slice2VolError(f"stack tilt maximum must be between 0 and 90 degrees, got {self.stack_tilt_max}")
        if not (math.isfinite(self.signal_loss) and 0 <= self.signal_loss <= 1):
            raise Slice2VolError(f"signal loss must be a fraction of the slices between 0 and 1, got {self.signal_loss}")
        if not (math.isfinite(self.turn) and 0 <= self.turn <= 180):
            raise Slice2VolError(f"a turn must be between 0 and 180 degrees, got {self.turn}")
        if self.bias_order < 1:
            raise Slice2VolError(f"bias field order must be at least 1, got {self.bias_order}")
        if int(self.zero_fill) != self.zero_fill or not 1 <= self.zero_fill <= 4:
            raise Slice2VolError(f"the in-plane zero filling must be a whole factor 1..4, got {self.zero_fill}")
        if self.profile not in PROFILES:
            raise Slice2VolError(f"unknown slice profile {self.profile!r} (use {', '.join(PROFILES)})")
        motion_level(self.motion)  # raises for an unknown level

    def to_dict(self) -> dict:
        d = asdict(self)
        d["orientations"] = self.stack_orientations()
        return d


@dataclass
class StackGeometry:
    """Where and when one stack is acquired (JSON-ready).

    Attributes:
        name: output file name, ``stack_XX.nii.gz``.
        orientation: requested orientation; ``base`` the orthogonal one it derives from.
        tilt_axis: ``(3,)`` world unit axis of the oblique tilt, or ``None``.
        tilt_deg: tilt angle (0 unless oblique).
        affine: ``(4, 4)`` voxel-to-world, float32-exact.
        shape: ``(H, W, N)``.
        thickness: slice thickness mm.
        order: ``(N,)`` acquisition order of slice ``k`` within the stack.
        time_offset: global time of the stack's first acquired slice.
        interleave: number of interleave packages of ``order`` (0 in parameters recorded before
            it was kept: read ``order``).
        stack_tilt_axis: ``(3,)`` world unit axis of the extra stack tilt
            (``SimulationConfig.stack_tilt_max``), or ``None``; ``stack_tilt_deg`` its angle.
        profile: the slice profile it is rendered with (:func:`slice_psf`).
        zero_fill: in-plane zero-filling factor of the stored stack (``SimulationConfig.zero_fill``);
            ``affine`` and ``shape`` are those of the acquisition.
    """

    name: str
    orientation: str
    base: str
    tilt_axis: list[float] | None
    tilt_deg: float
    affine: list[list[float]]
    shape: list[int]
    thickness: float
    order: list[int]
    time_offset: int
    interleave: int = 0
    stack_tilt_axis: list[float] | None = None
    stack_tilt_deg: float = 0.0
    profile: str = "gaussian"
    zero_fill: int = 1

    @property
    def times(self) -> np.ndarray:
        """``(N,)`` global acquisition time of every slice."""
        return self.time_offset + np.asarray(self.order, dtype=np.float64)

    def nominal_poses(self) -> tuple[np.ndarray, tuple[float, float], float]:
        """``stack_slice_poses`` of this geometry: poses ``(N, 4, 4)``, spacing, slice spacing."""
        return stack_slice_poses(np.asarray(self.affine, dtype=np.float64), tuple(self.shape))


@dataclass
class ArtefactParams:
    """Sampled intensity artefacts (JSON-ready; per-stack lists are empty when disabled).

    Attributes:
        noise_sd: absolute Rician noise sd (intensity units); 0 disables.
        noise_seed: seed of the noise of stack ``s`` is ``noise_seed + s``.
        bias_order: order of the bias polynomial.
        bias_coeffs: per stack, coefficients of the monomials ``x^a y^b z^c``,
            ``1 <= a + b + c <= order`` (order of :func:`_monomials`) in normalised world
            coordinates ``(x - centre) / bias_radius``.
        bias_radius: per stack, mm.
        slice_bias_coeffs: per stack ``(N, 6)`` coefficients of ``1, u, v, u^2, uv, v^2``, in-plane
            coordinates normalised to ``[-1, 1]``.
        gamma: per stack gamma exponent.
        signal_loss: per stack, the slices with signal loss: ``{"slice": k, "depth": d, "band":
            None | {"angle_deg", "offset", "width"}}`` (see :func:`signal_loss_field`).
    """

    noise_sd: float = 0.0
    noise_seed: int = 0
    bias_order: int = 3
    bias_coeffs: list[list[float]] = field(default_factory=list)
    bias_radius: list[float] = field(default_factory=list)
    slice_bias_coeffs: list[list[list[float]]] = field(default_factory=list)
    gamma: list[float] = field(default_factory=list)
    signal_loss: list[list[dict]] = field(default_factory=list)


@dataclass
class SimulationParams:
    """Everything a deterministic :func:`apply_simulation` needs besides the volume and mask.

    Attributes:
        centre: ``(3,)`` brain centre (mask centroid), world mm.
        intensity_ref: mean ground-truth intensity inside the mask.
        geometry: one :class:`StackGeometry` per stack.
        motion: :class:`~slice2vol.simulation.motion.MotionParams`.
        artefacts: :class:`ArtefactParams`.
    """

    centre: list[float]
    intensity_ref: float
    geometry: list[StackGeometry]
    motion: MotionParams
    artefacts: ArtefactParams

    def to_dict(self) -> dict:
        return {
            "centre": self.centre,
            "intensity_ref": self.intensity_ref,
            "geometry": [asdict(g) for g in self.geometry],
            "motion": self.motion.to_dict(),
            "artefacts": asdict(self.artefacts),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SimulationParams":
        return cls(
            centre=list(d["centre"]),
            intensity_ref=float(d["intensity_ref"]),
            geometry=[StackGeometry(**g) for g in d["geometry"]],
            motion=MotionParams.from_dict(d["motion"]),
            artefacts=ArtefactParams(**d["artefacts"]),
        )


@dataclass
class SimulationResult:
    """Output of a simulation.

    Attributes:
        stacks: simulated :class:`Stack` objects: ``slices (N, H, W)`` float32, ``mask`` the
            simulated brain mask, ``poses`` the NOMINAL poses (as read from the header),
            ``order`` the acquisition order.
        true_poses: per stack ``(N, 4, 4)`` float64 ground-truth slice-to-world poses.
        params: the parameters that produced them.
        config: the configuration they were sampled with (``None`` if params were given directly).
    """

    stacks: list[Stack]
    true_poses: list[np.ndarray]
    params: SimulationParams
    config: SimulationConfig | None = None

    @property
    def nominal_poses(self) -> list[np.ndarray]:
        """Per stack ``(N, 4, 4)`` nominal poses (what a reconstruction reads from the headers)."""
        return [st.poses for st in self.stacks]

    def poses_json(self) -> dict:
        """``io.poses_to_json`` of the ground-truth poses, with the parameters under ``simulation``."""
        extra = {"simulation": {
            "slice2vol_version": __version__,
            "config": None if self.config is None else self.config.to_dict(),
            "params": self.params.to_dict(),
        }}
        return poses_to_json(self.stacks, self.true_poses, extra=extra)


# --------------------------------------------------------------------------------- geometry


def interleaved_order(n: int, step: int = 2) -> np.ndarray:
    """Acquisition order ``(n,)`` of slices ``k = 0..n-1``: ``0, step, 2 step, ..., 1, 1 + step, ...``.

    ``order[k]`` is the time index (within the stack) at which slice ``k`` is acquired.  ``step``
    is the number of packages in SVRTK's ``-packages`` sense: package ``j`` holds the slices with
    ``k % step == j``, packages are acquired in the order ``0, 1, ..., step - 1`` and each in
    increasing ``k``.

    >>> interleaved_order(7, 3).tolist()  # packages {0, 3, 6}, {1, 4}, {2, 5}
    [0, 3, 5, 1, 4, 6, 2]
    """
    sequence = np.concatenate([np.arange(p, n, step) for p in range(min(step, n))]) if n else np.zeros(0, int)
    order = np.empty(n, dtype=np.int64)
    order[sequence] = np.arange(n)
    return order


def orientation_rotation(base: str, tilt_axis: Sequence[float] | None = None, tilt_deg: float = 0.0) -> np.ndarray:
    """``(3, 3)`` proper rotation whose columns are a stack's voxel axes ``i, j, k`` in world.

    ``base`` is axial/coronal/sagittal; a tilt rotates that frame by ``tilt_deg`` about the world
    axis ``tilt_axis``.
    """
    R = _AXES[base].copy()
    if tilt_axis is not None and tilt_deg != 0:
        a = np.asarray(tilt_axis, dtype=np.float64)
        rotvec = torch.from_numpy(a / np.linalg.norm(a) * math.radians(tilt_deg))
        R = axis_angle_to_matrix(rotvec).numpy() @ R
    return R


def stack_affine(rotation: np.ndarray, centre: np.ndarray, points: np.ndarray, spacing: float,
                 slice_spacing: float, margin: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Stack affine and shape whose field of view covers ``points`` + ``margin``, centred on ``centre``.

    Args:
        rotation: ``(3, 3)`` stack axes in world (columns).
        centre: ``(3,)`` world mm; the stack centre.
        points: ``(P, 3)`` world mm to cover (mask voxels).
        spacing, slice_spacing, margin: mm.
    Returns:
        float32-exact ``(4, 4)`` affine and ``(H, W, N)``.
    """
    half = np.abs((points - centre) @ rotation).max(0) + margin  # half-extent along i, j, k
    steps = np.array([spacing, spacing, slice_spacing])
    shape = tuple(int(n) for n in np.ceil(2 * half / steps - 1e-9).astype(int) + 1)
    A = np.eye(4)
    A[:3, :3] = rotation * steps
    A[:3, 3] = centre - A[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    # NIfTI stores the sform in float32: round now so the header reproduces these poses exactly.
    A = A.astype(np.float32).astype(np.float64)
    check_affine(A, "simulated stack")
    return A, shape  # type: ignore[return-value]


def _sample_orientation(name: str, tilt: float, rng: np.random.Generator) -> tuple[str, list[float] | None, float]:
    """Random part of a stack orientation: ``(base, tilt_axis, tilt_deg)``."""
    if name != "oblique":
        return name, None, 0.0
    base = _BASE_ORIENTATIONS[int(rng.integers(len(_BASE_ORIENTATIONS)))]
    phi = rng.uniform(0, 2 * math.pi)
    R = _AXES[base]
    axis = math.cos(phi) * R[:, 0] + math.sin(phi) * R[:, 1]  # in the slice plane
    return base, axis.tolist(), float(tilt)


def _sample_stack_tilt(R: np.ndarray, tilt_max: float, rng: np.random.Generator) -> tuple[list[float] | None, float]:
    """Extra tilt of a stack with axes ``R``: ``(axis in its plane, U[0, tilt_max] deg)``; no
    random number is drawn when ``tilt_max`` is 0."""
    if tilt_max <= 0:
        return None, 0.0
    deg = float(rng.uniform(0.0, tilt_max))
    phi = rng.uniform(0, 2 * math.pi)
    axis = math.cos(phi) * R[:, 0] + math.sin(phi) * R[:, 1]
    return (axis / np.linalg.norm(axis)).tolist(), deg


def realism_for(level: str) -> dict:
    """:class:`SimulationConfig` settings that go with a motion level in benchmarks: for
    ``extreme``, random 1..4 interleave packages per stack and every stack tilted by up to 15 deg
    (the acquisition of a severely moving fetus); ``{}`` (the defaults) for every other level.

    >>> realism_for("extreme")
    {'interleave': 0, 'stack_tilt_max': 15.0}
    """
    return dict(EXTREME_REALISM) if level == "extreme" else {}


def _sample_geometry(points: np.ndarray, centre: np.ndarray, config: SimulationConfig,
                     rng: np.random.Generator) -> list[StackGeometry]:
    out, t = [], 0
    for s, name in enumerate(config.stack_orientations()):
        base, axis, tilt = _sample_orientation(name, config.tilt, rng)
        R = orientation_rotation(base, axis, tilt)
        stack_axis, stack_deg = _sample_stack_tilt(R, config.stack_tilt_max, rng)
        if stack_axis is not None:
            R = axis_angle_to_matrix(torch.from_numpy(np.asarray(stack_axis) * math.radians(stack_deg))).numpy() @ R
        packages = int(rng.integers(1, MAX_PACKAGES + 1)) if config.interleave == 0 else int(config.interleave)
        A, shape = stack_affine(R, centre, points, config.spacing, config.thickness + config.gap, config.margin)
        order = interleaved_order(shape[2], packages)
        out.append(StackGeometry(f"stack_{s:02d}.nii.gz", name, base, axis, tilt, A.tolist(), list(shape),
                                 float(config.thickness), order.tolist(), t, packages, stack_axis, stack_deg,
                                 config.profile, int(config.zero_fill)))
        t += shape[2]
    return out


# ------------------------------------------------------------------------------ artefacts


def _monomials(order: int) -> list[tuple[int, int, int]]:
    """Exponents ``(a, b, c)`` with ``1 <= a + b + c <= order``; the constant is left out so the
    field has no global scaling (that is the gamma/normalisation's business)."""
    return [(a, b, d - a - b) for d in range(1, order + 1) for a in range(d, -1, -1) for b in range(d - a, -1, -1)]


def _normalised_coeffs(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """Uniform coefficients scaled so ``sum |c| = amplitude`` over the last axis: the log-field of
    monomials bounded by 1 then stays within ``[-amplitude, amplitude]``."""
    c = rng.uniform(-1, 1, size=shape)
    return c * amplitude / np.maximum(np.abs(c).sum(-1, keepdims=True), 1e-12)


def _stack_radius(geom: StackGeometry, centre: np.ndarray) -> float:
    """Largest |coordinate - centre| (any axis) over the stack's field of view corners, mm."""
    H, W, N = geom.shape
    corners = np.array([[i, j, k, 1.0] for i in (0, H - 1) for j in (0, W - 1) for k in (0, N - 1)])
    world = corners @ np.asarray(geom.affine).T
    return float(np.abs(world[:, :3] - centre).max()) or 1.0


def _sample_artefacts(geometry: list[StackGeometry], centre: np.ndarray, intensity_ref: float,
                      config: SimulationConfig, rng: np.random.Generator) -> ArtefactParams:
    p = ArtefactParams(noise_sd=float(config.noise * intensity_ref), noise_seed=int(rng.integers(2**31 - 1)),
                       bias_order=int(config.bias_order))
    n_terms = len(_monomials(config.bias_order))
    for g in geometry:
        if config.bias > 0:
            p.bias_coeffs.append(_normalised_coeffs(rng, (n_terms,), config.bias).tolist())
            p.bias_radius.append(_stack_radius(g, centre))
        if config.slice_bias > 0:
            p.slice_bias_coeffs.append(_normalised_coeffs(rng, (g.shape[2], _SLICE_BIAS_TERMS), config.slice_bias).tolist())
        if config.gamma > 0:
            p.gamma.append(float(math.exp(rng.normal(0, config.gamma))))
    if config.signal_loss > 0:  # drawn last, so the other artefacts of a seed do not change with it
        p.signal_loss = [_sample_signal_loss(g.shape[2], config.signal_loss, rng) for g in geometry]
    return p


def _plane_coords(H: int, W: int, device) -> tuple[Tensor, Tensor]:
    """In-plane pixel coordinates ``(H, W)`` each, along the slice's two axes, normalised to
    ``[-1, 1]`` (0 along an axis one pixel long), float64."""
    u = torch.linspace(-1, 1, H, dtype=torch.float64, device=device) if H > 1 else torch.zeros(1, dtype=torch.float64, device=device)
    v = torch.linspace(-1, 1, W, dtype=torch.float64, device=device) if W > 1 else torch.zeros(1, dtype=torch.float64, device=device)
    return torch.meshgrid(u, v, indexing="ij")


#: Signal loss (:func:`signal_loss_field`): depth range, share of whole-slice losses, band
#: half-width range (sd, in-plane coordinates normalised to [-1, 1]) and centre offset range.
SIGNAL_LOSS_DEPTH = (0.5, 1.0)
SIGNAL_LOSS_WHOLE_SLICE = 0.3
SIGNAL_LOSS_WIDTH = (0.15, 0.5)
SIGNAL_LOSS_OFFSET = 0.3


def _sample_signal_loss(n_slices: int, fraction: float, rng: np.random.Generator) -> list[dict]:
    chosen = np.sort(rng.choice(n_slices, size=int(round(fraction * n_slices)), replace=False))
    out = []
    for k in chosen:
        depth = float(rng.uniform(*SIGNAL_LOSS_DEPTH))
        band = None
        if rng.random() >= SIGNAL_LOSS_WHOLE_SLICE:
            band = {"angle_deg": float(rng.uniform(0, 180)), "offset": float(rng.uniform(-SIGNAL_LOSS_OFFSET, SIGNAL_LOSS_OFFSET)),
                    "width": float(rng.uniform(*SIGNAL_LOSS_WIDTH))}
        out.append({"slice": int(k), "depth": depth, "band": band})
    return out


def signal_loss_field(losses: Sequence[dict], N: int, H: int, W: int, device=None) -> Tensor:
    """Multiplicative field ``(N, H, W)`` of motion-induced signal loss (1 where there is none).

    Fetal T2 slices are single-shot fast spin echo images: a fetus that moves *while* a slice is
    acquired dephases its spins, and the slice comes out dark, wholly or in a band (the slice-level
    outliers that SVRTK's robust statistics were made for).  Each lost slice is multiplied by
    ``1 - depth * g``: ``g = 1`` (whole slice) or a Gaussian band ``g = exp(-t^2 / (2 width^2))``,
    ``t = u cos(angle) + v sin(angle) - offset`` with ``u, v`` the pixel coordinates along the
    slice's two axes normalised to ``[-1, 1]``.  Sampled depth 0.5-1, 30 % whole slices, widths
    0.15-0.5 (:data:`SIGNAL_LOSS_DEPTH` etc.); our choice, no published model is followed.

    >>> f = signal_loss_field([{"slice": 1, "depth": 0.75, "band": None}], 3, 2, 2)
    >>> f[:, 0, 0].tolist()
    [1.0, 0.25, 1.0]
    """
    field_ = torch.ones((N, H, W), dtype=torch.float64, device=device)
    uu, vv = _plane_coords(H, W, device)
    for loss in losses:
        band = loss.get("band")
        if band is None:
            g = torch.ones_like(uu)
        else:
            th = math.radians(band["angle_deg"])
            t = uu * math.cos(th) + vv * math.sin(th) - band["offset"]
            g = torch.exp(-t * t / (2 * band["width"] ** 2))
        field_[int(loss["slice"])] *= 1 - loss["depth"] * g
    return field_.to(torch.float32)


def _bias_field(geom: StackGeometry, coeffs: Sequence[float], radius: float, order: int,
                centre: Sequence[float], device) -> Tensor:
    """Per-stack multiplicative field ``(N, H, W)`` in world (scanner) coordinates."""
    H, W, N = geom.shape
    A = torch.as_tensor(geom.affine, dtype=torch.float64, device=device)
    k, i, j = torch.meshgrid(*(torch.arange(n, dtype=torch.float64, device=device) for n in (N, H, W)), indexing="ij")
    ijk = torch.stack([i, j, k], -1)
    x = (ijk @ A[:3, :3].T + A[:3, 3] - torch.as_tensor(centre, dtype=torch.float64, device=device)) / radius
    log_field = torch.zeros((N, H, W), dtype=torch.float64, device=device)
    for c, (a, b, d) in zip(coeffs, _monomials(order)):
        log_field += c * x[..., 0] ** a * x[..., 1] ** b * x[..., 2] ** d
    return torch.exp(log_field).to(torch.float32)


def _slice_bias_field(coeffs: Sequence[Sequence[float]], H: int, W: int, device) -> Tensor:
    """Per-slice in-plane quadratic multiplicative field ``(N, H, W)``."""
    uu, vv = _plane_coords(H, W, device)
    terms = torch.stack([torch.ones_like(uu), uu, vv, uu * uu, uu * vv, vv * vv])  # (6, H, W)
    C = torch.as_tensor(coeffs, dtype=torch.float64, device=device)  # (N, 6)
    return torch.exp(torch.einsum("nt,thw->nhw", C, terms)).to(torch.float32)


def _rician(signal: Tensor, sd: float, seed: int) -> Tensor:
    """Magnitude of the signal plus complex Gaussian noise of sd ``sd`` per channel."""
    g = torch.Generator(device=signal.device)
    g.manual_seed(seed)
    re = torch.randn(signal.shape, generator=g, device=signal.device, dtype=signal.dtype)
    im = torch.randn(signal.shape, generator=g, device=signal.device, dtype=signal.dtype)
    return torch.sqrt((signal + sd * re) ** 2 + (sd * im) ** 2)


def _gamma(x: Tensor, gamma: float) -> Tensor:
    """``max * (x / max)^gamma``: contrast change that keeps the intensity range."""
    top = x.max()
    return x if top <= 0 else top * (x / top) ** gamma


def _apply_artefacts(signal: Tensor, s: int, geom: StackGeometry, params: SimulationParams) -> Tensor:
    a = params.artefacts
    x = signal
    if a.signal_loss and a.signal_loss[s]:  # a loss of signal, before the thermal noise
        x = x * signal_loss_field(a.signal_loss[s], geom.shape[2], geom.shape[0], geom.shape[1], x.device)
    if a.noise_sd > 0:
        x = _rician(x, a.noise_sd, a.noise_seed + s)
    if a.bias_coeffs:
        x = x * _bias_field(geom, a.bias_coeffs[s], a.bias_radius[s], a.bias_order, params.centre, x.device)
    if a.slice_bias_coeffs:
        x = x * _slice_bias_field(a.slice_bias_coeffs[s], geom.shape[0], geom.shape[1], x.device)
    x = x.clamp_min(0)
    if a.gamma:
        x = _gamma(x, a.gamma[s])
    return x


# ------------------------------------------------------------------------------ rendering


def _dilate(binary: Tensor, r: int) -> Tensor:
    """Box dilation of a bool volume by ``r`` voxels, one axis at a time (the box is separable);
    shifted ORs on bytes are far cheaper than a ``(2r+1)``-wide max-pool on floats."""
    x = binary.bool()
    for axis in range(3):
        out = x.clone()
        n = x.shape[axis]
        for shift in range(1, min(r, n - 1) + 1):
            out.narrow(axis, shift, n - shift).logical_or_(x.narrow(axis, 0, n - shift))
            out.narrow(axis, 0, n - shift).logical_or_(x.narrow(axis, shift, n - shift))
        x = out
    return x


def _support(data: Tensor, affine: np.ndarray, reach_mm: float) -> tuple[Tensor, np.ndarray]:
    """Indicator of where a pixel's PSF can read a non-zero voxel, on a padded grid.

    A PSF node lies within ``reach_mm`` of its pixel and trilinear reads reach one voxel beyond
    it, so dilating the non-zero voxels by ``reach / voxel + 2`` and sampling the result at the
    pixel centre is positive whenever the full PSF could see anything.  The grid is padded by the
    same amount so pixels just outside the volume are still tested correctly.
    """
    res = float(np.linalg.norm(affine[:3, :3], axis=0).min())
    r = int(math.ceil(reach_mm / res)) + 2
    padded = F.pad((data != 0).to(torch.uint8), (r,) * 6)
    shift = np.eye(4)
    shift[:3, 3] = -r
    return _dilate(padded, r).float(), np.asarray(affine, dtype=np.float64) @ shift


def render_stack(
    volume: Tensor,
    affine: np.ndarray,
    poses: np.ndarray,
    shape: Sequence[int],
    spacing: tuple[float, float],
    thickness: float,
    quality: str = "high",
    support: tuple[Tensor, np.ndarray] | None = None,
    chunk: int = RENDER_CHUNK,
    progress=None,
    profile: str = "gaussian",
) -> Tensor:
    """Slices of a stack acquired from ``volume`` at ``poses`` through the shared forward model.

    Args:
        volume: ``(Ni, Nj, Nk)`` float tensor (its device is used).
        affine: ``(4, 4)`` voxel-to-world of ``volume``.
        poses: ``(N, 4, 4)`` slice-to-world poses to acquire at.
        shape: ``(H, W, N)`` stack shape.
        spacing: in-plane pixel spacing mm; thickness: slice thickness mm.
        quality: ``"high"`` for images (the PSF of ``profile``, :func:`slice_psf`), ``"thin"`` for
            masks (unit-thin planes).
        support: optional ``(indicator, affine)`` from :func:`_support`; pixels where it is 0 are
            left at 0 without rendering.
        chunk: pixels per ``forward`` chunk.
        progress: optional tqdm bar, advanced by rendered pixels.
        profile: one of :data:`PROFILES`.
    Returns:
        ``(N, H, W)`` float32.
    """
    H, W, N = (int(n) for n in shape)
    device = volume.device
    P = torch.as_tensor(poses, dtype=torch.float32, device=device)
    xy = slice_pixel_coords(H, W, spacing, device=device).reshape(H * W, 3)
    coords = xy.repeat(N, 1)
    sid = torch.arange(N, device=device).repeat_interleave(H * W)
    resolution = float(np.linalg.norm(affine[:3, :3], axis=0).min())
    if quality == "thin":
        psf = psf_kernel(torch.tensor([spacing] * N, dtype=torch.float32, device=device),
                         torch.full((N,), float(thickness), dtype=torch.float32, device=device), resolution, quality="thin")
    else:
        psf = slice_psf(spacing, thickness, resolution, profile, N, device)
    if support is not None:
        thin = psf_kernel(torch.zeros(N, 2, device=device), torch.zeros(N, device=device), 1.0, quality="thin")
        keep = torch.nonzero(forward(support[0], support[1], P, coords, sid, thin, chunk) > 0).squeeze(1)
    else:
        keep = torch.arange(N * H * W, device=device)
    if progress is not None:
        progress.update(N * H * W - int(keep.numel()))  # skipped pixels are done already
    out = torch.zeros(N * H * W, dtype=torch.float32, device=device)
    vol = volume.to(torch.float32)
    step = chunk * 4  # a few forward chunks per progress update
    with torch.no_grad():
        for start in range(0, keep.numel(), step):
            idx = keep[start:start + step]
            out[idx] = forward(vol, affine, P, coords[idx], sid[idx], psf, chunk)
            if progress is not None:
                progress.update(int(idx.numel()))
    return out.reshape(N, H, W)


def slice_psf(spacing: tuple[float, float], thickness: float, resolution: float, profile: str = "gaussian",
              n: int = 1, device: torch.device | str = "cpu") -> PSF:
    """The PSF ``n`` slices are rendered with (``float32``, no volume part: every node explicit).

    Args:
        spacing: in-plane pixel spacing ``(dx, dy)`` mm; thickness: slice thickness mm.
        resolution: voxel size of the volume rendered from, mm (node spacing at most half of it).
        profile: ``"gaussian"``: :func:`slice2vol.core.acquisition.psf_kernel` with
            ``quality="high"`` (the reconstruction's model: in-plane FWHM 1.2 pixels, through-plane
            FWHM = thickness, but a 3x3 in-plane rule and half-voxel steps).  ``"box"``: uniform
            over the pixel in-plane (4 x 4 midpoints) and over the slab ``[-thickness/2,
            thickness/2]`` through-plane (midpoints at most half a voxel apart): the ideal
            rectangular slice profile, narrower than the Gaussian of the same FWHM (standard
            deviations ``thickness / sqrt(12)`` vs ``thickness / 2.355``).
    Returns:
        :class:`slice2vol.core.acquisition.PSF` of ``n`` identical slices.
    """
    if profile == "gaussian":
        return psf_kernel(torch.tensor([list(spacing)] * n, dtype=torch.float32, device=device),
                          torch.full((n,), float(thickness), dtype=torch.float32, device=device), resolution,
                          quality="high")
    if profile != "box":
        raise Slice2VolError(f"unknown slice profile {profile!r} (use {', '.join(PROFILES)})")
    u = (torch.arange(4, dtype=torch.float64) + 0.5) / 4 - 0.5
    nz = max(1, math.ceil(float(thickness) / (resolution / 2)))
    z = ((torch.arange(nz, dtype=torch.float64) + 0.5) / nz - 0.5) * float(thickness)
    gx, gy, gz = torch.meshgrid(u * spacing[0], u * spacing[1], z, indexing="ij")
    off = torch.stack([gx, gy, gz], -1).reshape(-1, 3)
    w = torch.full((off.shape[0],), 1.0 / off.shape[0], dtype=torch.float64)
    return PSF(off[None].repeat(n, 1, 1).to(device, torch.float32), w[None].repeat(n, 1).to(device, torch.float32))


def _psf_stats(geometry: Sequence[StackGeometry], resolution: float) -> tuple[float, int]:
    """Largest distance (mm) from a pixel centre to one of its PSF nodes, and the largest node
    count, over all stacks (``quality="high"``)."""
    reach, nodes = 0.0, 1
    for g in geometry:
        spacing = float(np.linalg.norm(np.asarray(g.affine)[:3, 0]))
        psf = slice_psf((spacing, spacing), g.thickness, resolution, g.profile)
        used = psf.weights[0] > 0
        reach = max(reach, float(psf.offsets[0][used].norm(dim=-1).max()))
        nodes = max(nodes, int(used.sum()))
    return reach, nodes


# --------------------------------------------------------------------------- public pipeline


def _brain_mask(volume: Volume, mask: Tensor | None) -> Tensor:
    """The mask to simulate with: ``mask``, else ``volume.mask``, else the non-zero voxels."""
    m = mask if mask is not None else volume.mask
    if m is None:
        log.info("no mask given: using the non-zero voxels of the volume as the brain")
        m = volume.data != 0
    m = torch.as_tensor(m).to(volume.data.device).bool()
    if tuple(m.shape) != tuple(volume.shape):
        raise Slice2VolError(f"mask shape {tuple(m.shape)} does not match the volume shape {tuple(volume.shape)}")
    if not bool(m.any()):
        raise Slice2VolError("the brain mask is empty, so there is nothing to simulate")
    return m


def _mask_centre(mask: Tensor, affine: np.ndarray) -> np.ndarray:
    """World coordinates ``(3,)`` of the mask centroid."""
    total = float(mask.sum())
    ijk = [float((mask.sum(tuple(a for a in range(3) if a != axis)).double()
                  * torch.arange(mask.shape[axis], dtype=torch.float64, device=mask.device)).sum()) / total
           for axis in range(3)]
    return affine[:3, :3] @ np.asarray(ijk) + affine[:3, 3]


def _mask_extreme_points(mask: Tensor, affine: np.ndarray) -> np.ndarray:
    """World coordinates ``(P, 3)`` of the first and last mask voxel of every ``(i, j)`` column.

    A linear projection is extreme over a column at one of its ends, so these few points give
    the same field of view as all mask voxels at a fraction of the cost.
    """
    n = mask.shape[2]
    any_k = mask.any(2)
    first = mask.to(torch.uint8).argmax(2)
    last = n - 1 - mask.flip(2).to(torch.uint8).argmax(2)
    ij = torch.nonzero(any_k)
    ends = torch.cat([torch.cat([ij, first[any_k][:, None]], 1), torch.cat([ij, last[any_k][:, None]], 1)])
    return ends.cpu().numpy().astype(np.float64) @ affine[:3, :3].T + affine[:3, 3]


def _numpy_rng(generator) -> np.random.Generator:
    """Accept a numpy Generator, a torch Generator (its stream seeds numpy), an int seed, or None
    (fresh OS entropy: not reproducible).  Parameters are sampled with numpy on the host so the
    same seed gives the same simulation on every device."""
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
        return np.random.default_rng(int(seed))
    return np.random.default_rng(generator)


def _check_volume(volume: Volume) -> None:
    if volume.data.dim() != 3:
        raise Slice2VolError(f"the ground-truth volume must be 3D, got shape {tuple(volume.data.shape)}")
    check_affine(volume.affine, "ground-truth volume")
    if not bool(torch.isfinite(volume.data).all()):
        raise Slice2VolError("the ground-truth volume contains NaN or infinite values")


def sample_simulation_params(volume: Volume, mask: Tensor | None, config: SimulationConfig,
                             generator=None) -> SimulationParams:
    """Draw every random quantity of a simulation (geometry of oblique stacks, motion, artefacts).

    Args:
        volume: ground truth, ``data (Ni, Nj, Nk)`` with its affine.
        mask: ``(Ni, Nj, Nk)`` brain mask, or ``None`` (then ``volume.mask``, else ``data != 0``).
        config: :class:`SimulationConfig`.
        generator: ``torch.Generator``, ``numpy.random.Generator``, int seed or ``None``.
    """
    config.validate()
    _check_volume(volume)
    rng = _numpy_rng(generator)
    m = _brain_mask(volume, mask)
    points = _mask_extreme_points(m, volume.affine)
    centre = _mask_centre(m, volume.affine)
    intensity_ref = float(volume.data[m].float().mean())
    geometry = _sample_geometry(points, centre, config, rng)
    normals = [np.asarray(g.affine)[:3, 2] for g in geometry]
    motion = sample_motion(config.motion, [g.times for g in geometry], normals, centre, rng)
    artefacts = _sample_artefacts(geometry, centre, intensity_ref, config, rng)
    if config.turn > 0:  # drawn last, so the rest of a seed's simulation does not change with it
        add_turn(motion, [g.times for g in geometry], config.turn, rng)
    return SimulationParams(centre.tolist(), intensity_ref, geometry, motion, artefacts)


def _progress_bar(geometry: Sequence[StackGeometry], nodes: int, progress: bool | None):
    """A tqdm bar over pixels when asked, or (``None``) when rendering will take seconds on a terminal."""
    total = sum(int(np.prod(g.shape)) for g in geometry)
    if progress is None:
        progress = total * nodes > _PROGRESS_SAMPLES and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="px", unit_scale=True, desc="simulate", leave=False)


def apply_simulation(volume: Volume, mask: Tensor | None, params: SimulationParams, config: SimulationConfig | None = None,
                     chunk: int = RENDER_CHUNK, progress: bool | None = None) -> SimulationResult:
    """Deterministically simulate the stacks described by ``params`` (see the module doc).

    Args:
        volume: ground truth on the compute device; ``mask`` as in :func:`sample_simulation_params`.
        params: from :func:`sample_simulation_params` (or :meth:`SimulationParams.from_dict`).
        config: recorded in the result only.
        chunk: pixels per ``forward`` chunk; progress: tqdm bar (``None``: automatic).
    """
    _check_volume(volume)
    m = _brain_mask(volume, mask)
    geometry = params.geometry
    nominal = [g.nominal_poses()[0] for g in geometry]
    true_poses = apply_motion(params.motion, nominal, [g.times for g in geometry])
    resolution = float(volume.resolution.min())
    reach, nodes = _psf_stats(geometry, resolution)
    support = _support(volume.data, volume.affine, reach)
    mask_values = m.float()
    bar = _progress_bar(geometry, nodes, progress)
    stacks = []
    try:
        for s, (g, P_true) in enumerate(zip(geometry, true_poses)):
            t0 = time.perf_counter()
            poses, spacing, _ = g.nominal_poses()
            signal = render_stack(volume.data, volume.affine, P_true, g.shape, spacing, g.thickness, "high",
                                  support, chunk, bar, g.profile)
            smask = render_stack(mask_values, volume.affine, P_true, g.shape, spacing, g.thickness, "thin",
                                 None, chunk) > 0.5
            slices = _apply_artefacts(signal, s, g, params)
            st = Stack(
                slices=slices, mask=smask, poses=poses, spacing=spacing, thickness=g.thickness,
                affine=np.asarray(g.affine, dtype=np.float64), index=np.arange(g.shape[2]),
                order=np.asarray(g.order, dtype=np.int64), name=g.name,
                meta={"path": g.name, "orientation": g.orientation, "time": g.times},
            )
            if g.zero_fill > 1:
                stored = zero_fill_stack(st, g.zero_fill)
                # the stored grid's slice frames are centred elsewhere in the plane: the true poses
                # move with them (slice frame change old -> new, the same for true and nominal)
                change = np.linalg.inv(np.asarray(st.poses, dtype=np.float64)) @ np.asarray(stored.poses, dtype=np.float64)
                true_poses[s] = np.asarray(P_true, dtype=np.float64) @ change
                st = stored
            stacks.append(st)
            log.debug("%s: %s %dx%dx%d rendered in %.2f s", g.name, g.orientation, *g.shape, time.perf_counter() - t0)
    finally:
        if bar is not None:
            bar.close()
    return SimulationResult(stacks, true_poses, params, config)


def zero_fill_stack(stack: Stack, factor: int) -> Stack:
    """``stack`` stored as a scanner's in-plane interpolation would: each slice's 2D spectrum padded
    with zeros to ``factor`` times the pixels (:func:`~slice2vol.core.inplane.fourier_resize`), the magnitude of the result (intensities kept), the
    mask by nearest neighbour.  Pixel 0 stays where it was (the DFT's samples are anchored there),
    so the affine keeps its origin, its in-plane columns shrink by ``factor``, and the poses follow
    from it (:func:`~slice2vol.core.geometry.stack_slice_poses`)."""
    if factor == 1:
        return stack
    n, h, w = stack.slices.shape
    H, W = h * factor, w * factor
    y = fourier_resize(stack.slices, (H, W)).abs()
    # fine pixel i sits at coarse i / factor: nearest coarse pixel round(i / factor), not i // factor
    idx_i = torch.clamp(torch.round(torch.arange(H) / factor).long(), max=h - 1)
    idx_j = torch.clamp(torch.round(torch.arange(W) / factor).long(), max=w - 1)
    m = stack.mask[:, idx_i][:, :, idx_j]
    A = np.asarray(stack.affine, dtype=np.float64).copy()
    A[:3, :2] /= factor
    poses, spacing, _ = stack_slice_poses(A, (H, W, n))
    return replace(stack, slices=y.to(stack.slices.dtype), mask=m, affine=A, spacing=spacing,
                   poses=poses[np.asarray(stack.index)] if len(stack.index) == n else poses)


def simulate_stacks(volume: Volume, mask: Tensor | None, config: SimulationConfig, generator=None, *,
                    chunk: int = RENDER_CHUNK, progress: bool | None = None) -> SimulationResult:
    """Simulate motion-corrupted stacks: :func:`sample_simulation_params` then :func:`apply_simulation`.

    Args:
        volume: ground truth ``data (Ni, Nj, Nk)``, ``affine (4, 4)`` (rendering runs on its device).
        mask: ``(Ni, Nj, Nk)`` bool brain mask or ``None`` (``volume.mask``, else ``data != 0``).
        config: :class:`SimulationConfig`.
        generator: ``torch.Generator`` / ``numpy.random.Generator`` / int seed; same seed, same output.
        chunk, progress: rendering options (see :func:`apply_simulation`).
    Returns:
        :class:`SimulationResult` (stacks with nominal poses, true poses, sampled parameters).
    """
    params = sample_simulation_params(volume, mask, config, generator)
    return apply_simulation(volume, mask, params, config, chunk=chunk, progress=progress)


# ------------------------------------------------------------------------------- output / CLI


def _output_folder(output: str | Path) -> Path:
    """Create the output folder (or accept an existing one), refusing a file in its place."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise Slice2VolError(f"output {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Slice2VolError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    return out


def save_simulation(result: SimulationResult, output: str | Path, protect: Sequence[str | Path] = ()) -> list[Path]:
    """Write ``stack_XX.nii.gz`` (float32), ``mask_XX.nii.gz`` (uint8) and ``gt_poses.json`` into ``output``."""
    out = _output_folder(output)
    written = []
    for s, st in enumerate(result.stacks):
        written.append(save_stack(st, out / st.name, protect=protect))
        mask = np.moveaxis(st.mask.cpu().numpy(), 0, 2).astype(np.uint8)
        written.append(save_volume(mask, out / f"mask_{s:02d}.nii.gz", st.affine, protect=protect, dtype=np.uint8))
    written.append(write_json(result.poses_json(), out / "gt_poses.json", protect=protect))
    return written


def config_from_args(args) -> SimulationConfig:
    """:class:`SimulationConfig` from the ``simulate`` subcommand's options."""
    return SimulationConfig(
        n_stacks=args.stacks,
        orientations=tuple(args.orientations) if args.orientations else None,
        spacing=args.spacing, thickness=args.thickness, gap=args.gap, tilt=args.tilt,
        motion=args.motion, noise=args.noise, bias=args.bias, gamma=args.gamma,
        slice_bias=getattr(args, "slice_bias", 0.0), interleave=getattr(args, "interleave", 2),
        margin=getattr(args, "margin", 10.0), stack_tilt_max=getattr(args, "stack_tilt_max", 0.0),
        signal_loss=getattr(args, "signal_loss", 0.0), turn=getattr(args, "turn", 0.0),
        profile=getattr(args, "slice_profile", "gaussian"), zero_fill=getattr(args, "zero_fill", 1),
    )


def simulate_command(args) -> int:
    """``slice2vol simulate``: simulate stacks from a ground-truth volume into ``--output``."""

    config = config_from_args(args)
    config.validate()  # fail on options and output before reading any file or simulating
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise Slice2VolError(f"output {args.output} exists and is not a folder")
    device = resolve_device(args.device)
    generator = seed_everything(args.seed)
    volume = load_volume(args.volume, args.mask).to(device)
    t0 = time.perf_counter()
    result = simulate_stacks(volume, None, config, generator)
    protect = [args.volume] + ([args.mask] if args.mask else [])
    written = save_simulation(result, args.output, protect=protect)
    log.info("simulated %d stacks (%s motion) in %.1f s; wrote %d files to %s",
             len(result.stacks), config.motion, time.perf_counter() - t0, len(written), args.output)
    return 0
