"""The benchmark's two figures."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from slice2vol.evaluation.benchmark.settings import NAIVE
from slice2vol.evaluation.benchmark.tables import _ordered

log = logging.getLogger("slice2vol")


def _figure_save(fig, path: Path) -> None:
    from slice2vol import io

    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor="white"))


def plot_quality(rows: Sequence[dict], path: Path) -> None:
    """Two panels, PSNR and SSIM against motion level, one line per method with sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    motions = _ordered(r["motion"] for r in rows)
    methods = _ordered(r["method"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110, constrained_layout=True)
    for ax, (key, label) in zip(axes, [("psnr", "PSNR (dB)"), ("ssim", "SSIM")]):
        for i, method in enumerate(methods):
            cells = {r["motion"]: r[key] for r in rows if r["method"] == method}
            x = [j for j, m in enumerate(motions) if m in cells and cells[m]["mean"] is not None]
            y = [cells[motions[j]]["mean"] for j in x]
            e = [cells[motions[j]]["sd"] or 0.0 for j in x]
            # a small horizontal offset per method keeps overlapping error bars readable
            xs = [j + (i - (len(methods) - 1) / 2) * 0.06 for j in x]
            ax.errorbar(xs, y, yerr=e, marker="o", capsize=3, label=method,
                        linestyle="--" if method == NAIVE else "-")
        ax.set_xticks(range(len(motions)), motions)
        ax.set_xlim(-0.5, len(motions) - 0.5)  # one motion level would otherwise spread the offsets edge to edge
        ax.set_xlabel("simulated motion")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Reconstruction quality vs motion (mean ± sd over cases)", fontsize=10)
    _figure_save(fig, path)
    plt.close(fig)


def plot_time(rows: Sequence[dict], path: Path) -> None:
    """Wall time per method (bars per motion level, sd error bars, log scale: naive is ~100x faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    motions = _ordered(r["motion"] for r in rows)
    methods = _ordered(r["method"] for r in rows)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(methods) + 2), 3.6), dpi=110, constrained_layout=True)
    width = 0.8 / max(len(motions), 1)
    for j, motion in enumerate(motions):
        cells = {r["method"]: r["time_s"] for r in rows if r["motion"] == motion}
        x = [i for i, m in enumerate(methods) if m in cells and cells[m]["mean"] is not None]
        y = [cells[methods[i]]["mean"] for i in x]
        e = [cells[methods[i]]["sd"] or 0.0 for i in x]
        ax.bar([i + (j - (len(motions) - 1) / 2) * width for i in x], y, width, yerr=e, capsize=3, label=motion)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_yscale("log")
    ax.set_ylabel("wall time per case (s)")
    ax.set_title("Time per method (mean ± sd over cases)", fontsize=10)
    ax.legend(title="motion", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _figure_save(fig, path)
    plt.close(fig)
