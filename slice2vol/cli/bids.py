"""BIDS discovery for ``slice2vol batch``: one job per subject (and session) of a BIDS dataset.

What is read (BIDS 1.9 names, nothing else is guessed):

* stacks: ``sub-<label>/[ses-<label>/]anat/*_T2w.nii[.gz]``, one stack per file, in name order;
* masks (optional ``--masks MASK_DERIV``): ``MASK_DERIV/sub-<label>/[ses-<label>/]anat/
  <stem>_desc-brain_mask.nii[.gz]`` for the stack ``<stem>_T2w.nii[.gz]``;
* thickness: the JSON sidecar ``<stem>_T2w.json``'s ``SliceThickness`` (mm), where present (the
  BIDS inheritance of sidecars from higher folders is not followed); its ``SliceTiming`` is read
  by the stack loader itself (:mod:`slice2vol.io.timing`).

Hand-written rather than pybids or bids2table: the three patterns above are all slice2vol reads,
and pybids would add SQLAlchemy and pandas to the install and index the whole dataset first.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from slice2vol.errors import Slice2VolError

__all__ = ["Subject", "discover"]

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_T2W = re.compile(r"^(?P<stem>sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_T2w\.nii(?:\.gz)?$")


@dataclass
class Subject:
    """One reconstruction job: a subject (and session) with its stacks, masks and thicknesses.

    ``problem`` is a one-line reason the job cannot run (e.g. a missing mask); it is reported in
    the summary and the batch goes on with the others.
    """

    label: str
    session: str | None
    stacks: list[Path]
    masks: list[Path] | None = None
    thickness: list[float | None] = field(default_factory=list)
    problem: str | None = None

    @property
    def key(self) -> str:
        """``sub-01`` or ``sub-01_ses-02``: the BIDS prefix of every output of this job."""
        return f"sub-{self.label}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def anat(self) -> Path:
        """``sub-01/[ses-02/]anat``: the job's folder under a BIDS root or derivatives root."""
        return Path(f"sub-{self.label}") / (f"ses-{self.session}" if self.session else "") / "anat"


def _labels(values: Sequence[str] | None, what: str) -> set[str] | None:
    if not values:
        return None
    out = {v.removeprefix("sub-").removeprefix("ses-") for v in values}
    bad = [v for v in out if not _LABEL.match(v)]
    if bad:
        raise Slice2VolError(f"{what}: not a BIDS label: {bad[0]!r} (letters and digits only)")
    return out


def _thickness(stack: Path) -> float | None:
    sidecar = stack.with_name(re.sub(r"\.nii(\.gz)?$", ".json", stack.name))
    if not sidecar.is_file():
        return None
    try:
        value = json.loads(sidecar.read_text()).get("SliceThickness")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None  # the loader reads the stack itself and reports what is wrong with it
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def discover(root, participants: Sequence[str] | None = None, sessions: Sequence[str] | None = None,
             masks=None) -> list[Subject]:
    """Every subject/session of the BIDS dataset ``root`` with at least one ``_T2w`` stack.

    Raises :class:`Slice2VolError` when ``root`` is not a BIDS dataset, a requested participant
    does not exist, or nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise Slice2VolError(f"BIDS root {root}: not a directory")
    if not (root / "dataset_description.json").is_file():
        raise Slice2VolError(f"BIDS root {root}: no dataset_description.json (not a BIDS dataset)")
    want_sub, want_ses = _labels(participants, "--participant-label"), _labels(sessions, "--session")
    mask_root = Path(masks) if masks else None
    if mask_root is not None and not mask_root.is_dir():
        raise Slice2VolError(f"--masks {mask_root}: not a directory")
    found: list[Subject] = []
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        label = sub.name[4:]
        if not _LABEL.match(label) or (want_sub is not None and label not in want_sub):
            continue
        ses_dirs = sorted(p for p in sub.glob("ses-*") if p.is_dir()) or [None]
        for ses in ses_dirs:
            session = ses.name[4:] if ses is not None else None
            if want_ses is not None and session not in want_ses:
                continue
            anat = (ses or sub) / "anat"
            stacks = sorted(p for p in anat.glob("*_T2w.nii*") if _T2W.match(p.name)) if anat.is_dir() else []
            if not stacks:
                continue
            s = Subject(label, session, stacks, thickness=[_thickness(p) for p in stacks])
            if mask_root is not None:
                ms = []
                for p in stacks:
                    stem = _T2W.match(p.name)["stem"]
                    cands = [mask_root / s.anat / f"{stem}_desc-brain_mask{ext}" for ext in (".nii.gz", ".nii")]
                    hit = next((c for c in cands if c.is_file()), None)
                    if hit is None:
                        s.problem = f"no brain mask {cands[0]} for {p.name}"
                        break
                    ms.append(hit)
                s.masks = ms if s.problem is None else None
            found.append(s)
    if want_sub is not None:
        missing = sorted(want_sub - {s.label for s in found})
        if missing:
            raise Slice2VolError(f"--participant-label: no T2w stacks for sub-{missing[0]} in {root}")
    if not found:
        raise Slice2VolError(f"BIDS root {root}: no sub-*/[ses-*/]anat/*_T2w.nii[.gz] stacks found")
    return found
