"""The atlas split, decided once: which atlases train, which select models, which test.

* ``train``: all 18 CRL 2017 atlases (``STA21``..``STA38``); the shipped cSVR model was trained on
  them, and simulator levels (:mod:`slice2vol.simulation.motion`, ``benchmarks/motion_levels.py``) are
  calibrated on them.
* ``validation``: three spina-bifida atlases, ``GA22_notoperated``, ``GA27_operated`` and
  ``GA32_operated``: model selection, hyper-parameter and threshold tuning, and every "try it and
  see" comparison during development.
* ``test``: the other 12 spina-bifida atlases.  Nothing is tuned on them: they are only for
  reporting final numbers of settings fixed beforehand (on train / validation), so the reported
  figures estimate performance on unseen anatomy honestly.

``slice2vol benchmark --atlases train|validation|test`` expands a split name to its atlases.
"""
from __future__ import annotations

from slice2vol.errors import Slice2VolError

__all__ = ["TRAIN_ATLASES", "VALIDATION_ATLASES", "TEST_ATLASES", "SPLITS", "split_atlases", "expand_atlases"]

#: CRL 2017 (Gholipour et al.), gestational weeks 21..38.
TRAIN_ATLASES: tuple[str, ...] = tuple(f"STA{w}" for w in range(21, 39))
#: Spina-bifida atlas 2021 (Fidon et al.), used for model selection and tuning.
VALIDATION_ATLASES: tuple[str, ...] = ("GA22_notoperated", "GA27_operated", "GA32_operated")
#: The remaining spina-bifida atlases: final reporting only, never tuned on.
TEST_ATLASES: tuple[str, ...] = (
    "GA21_notoperated", "GA23_notoperated", "GA24_notoperated", "GA25_notoperated",
    "GA25_operated", "GA26_operated", "GA28_operated", "GA29_operated",
    "GA30_operated", "GA31_operated", "GA33_operated", "GA34_operated",
)
SPLITS: dict[str, tuple[str, ...]] = {"train": TRAIN_ATLASES, "validation": VALIDATION_ATLASES, "test": TEST_ATLASES}


def split_atlases(name: str) -> tuple[str, ...]:
    """The atlases of split ``name`` (``train``, ``validation`` or ``test``).

    Raises:
        Slice2VolError: for an unknown split name.

    >>> split_atlases("validation")
    ('GA22_notoperated', 'GA27_operated', 'GA32_operated')
    """
    try:
        return SPLITS[name]
    except KeyError:
        raise Slice2VolError(f"unknown atlas split {name!r} (use {', '.join(SPLITS)})") from None


def expand_atlases(names) -> list[str]:
    """Replace split names in ``names`` by their atlases (order kept, duplicates dropped).

    >>> expand_atlases(["STA23", "validation", "GA27_operated"])
    ['STA23', 'GA22_notoperated', 'GA27_operated', 'GA32_operated']
    """
    out: list[str] = []
    for n in names:
        for a in SPLITS.get(n, (n,)):
            if a not in out:
                out.append(a)
    return out
