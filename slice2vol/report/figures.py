"""The report's figures (matplotlib object API, Agg canvas; no pyplot state)."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("slice2vol.report")
from slice2vol.report.data import (
    EXCLUDED_BELOW,
    EXCLUDED_COLOUR,
    N_EXAMPLE_SLICES,
    ReportData,
    StackReport,
    slice_motion,
)

# ----------------------------------------------------------------------------- figures


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _window(values: np.ndarray) -> tuple[float, float]:
    """Grey-level window: 1st to 99th percentile of ``values`` (the masked intensities)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def _axis_labels(affine: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """World-axis names, voxel sizes and origin of a grid whose axes follow +x, +y, +z; else None."""
    A = np.asarray(affine, dtype=float)
    vs = np.linalg.norm(A[:3, :3], axis=0)
    if np.allclose(A[:3, :3], np.diag(vs), atol=1e-3 * vs.max()):
        return ["x (mm, to R)", "y (mm, to A)", "z (mm, to S)"], vs, A[:3, 3]
    return None


def fig_views(data: ReportData):
    """Three orthogonal planes through the centre of the reconstructed region."""
    v = data.volume
    inside = v != 0
    idx = np.argwhere(inside)
    centre = np.round(idx.mean(0)).astype(int) if idx.size else np.array(v.shape) // 2
    lo, hi = _window(v[inside] if idx.size else v)
    lab = _axis_labels(data.affine)
    vs = np.linalg.norm(np.asarray(data.affine)[:3, :3], axis=0)
    names = lab[0] if lab else ["i (mm)", "j (mm)", "k (mm)"]
    origin = lab[2] if lab else np.zeros(3)
    fig = _figure(12, 4.6)
    axes = fig.subplots(1, 3)
    planes = [("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2))]
    im = None
    for ax, (name, fixed, (a, b)) in zip(axes, planes):
        img = np.take(v, centre[fixed], axis=fixed)  # axes (a, b) remain, in that order
        ext = [origin[a] - vs[a] / 2, origin[a] + (v.shape[a] - 0.5) * vs[a],
               origin[b] - vs[b] / 2, origin[b] + (v.shape[b] - 0.5) * vs[b]]
        im = ax.imshow(img.T, origin="lower", cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
        pos = origin[fixed] + centre[fixed] * vs[fixed]
        ax.set_title(f"{name} ({names[fixed].split(' ')[0]} = {pos:.1f} mm)")
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="intensity (template stack units)")
    return fig


def _example_slices(st: StackReport, n: int = N_EXAMPLE_SLICES) -> list[int]:
    """Positions of representative slices, sorted by slice index: evenly spread over the slices
    with a fair share of pixels, plus the largest excluded slice and the worst-NCC slice."""
    ok = np.flatnonzero(st.has_pixels)
    if ok.size == 0:
        return []
    # prefer slices with a fair share of pixels: edge slices with a few pixels say little
    counts = st.mask.reshape(st.mask.shape[0], -1).sum(1)
    big = ok[counts[ok] >= 0.25 * counts[ok].max()]
    base = big if big.size >= 2 else ok
    extra = []
    ex = np.flatnonzero(st.excluded)
    if ex.size:  # the excluded slice with the most pixels
        extra.append(int(ex[np.argmax(counts[ex])]))
    ncc = np.full(st.weights.shape, np.inf)
    ncc[base] = np.where(np.isfinite(st.ncc_after[base]), st.ncc_after[base], np.inf)
    if np.isfinite(ncc).any():
        extra.append(int(np.argmin(ncc)))
    n_even = max(1, n - len(set(extra)))
    picks = set(base[np.unique(np.round(np.linspace(0, base.size - 1, n_even)).astype(int))].tolist())
    picks.update(extra)
    return sorted(picks, key=lambda i: st.index[i])


def _bbox(mask: np.ndarray, margin: int = 2) -> tuple[slice, slice]:
    """Bounding box of a stack's ``(N, H, W)`` mask over all slices, as ``(H, W)`` slices."""
    m = mask.any(0)
    if not m.any():
        return slice(None), slice(None)
    ii, jj = np.nonzero(m)
    return (slice(max(ii.min() - margin, 0), ii.max() + margin + 1),
            slice(max(jj.min() - margin, 0), jj.max() + margin + 1))


def _slice_label(st: StackReport, i: int) -> str:
    ncc = st.ncc_after[i]
    return f"k={int(st.index[i])}" + (f", NCC {ncc:.2f}" if np.isfinite(ncc) else "") + f", w {st.weights[i]:.2f}"


def fig_stack_slices(st: StackReport):
    """Representative slices: acquired / simulated from the result / acquired minus simulated."""
    picks = _example_slices(st)
    n = max(1, len(picks))
    bi, bj = _bbox(st.mask)
    lo, hi = _window(st.acquired[st.mask])
    d = (st.acquired - st.simulated)[st.mask]
    dl = float(np.percentile(np.abs(d), 99)) if d.size else 1.0
    dl = dl if dl > 0 else 1.0
    hgt = st.acquired[:, bi, bj].shape[2] * st.spacing[1]
    wid = st.acquired[:, bi, bj].shape[1] * st.spacing[0]
    aspect = hgt / max(wid, 1e-6)
    fig = _figure(min(2.0 * n + 1.6, 14), min(3 * 2.0 * aspect + 0.9, 10))
    axes = np.asarray(fig.subplots(3, n, squeeze=False))
    rows = [("acquired", st.acquired, "gray", lo, hi), ("simulated", st.simulated, "gray", lo, hi),
            ("acquired - simulated", st.acquired - st.simulated, "RdBu_r", -dl, dl)]
    ims = [None, None, None]
    ext = [0, wid, 0, hgt]
    for r, (name, arr, cmap, a, b) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(picks):
                ax.axis("off")
                continue
            i = picks[c]
            img = np.where(st.mask[i], arr[i], np.nan)[bi, bj]
            ims[r] = ax.imshow(img.T, origin="lower", cmap=cmap, vmin=a, vmax=b, extent=ext,
                               interpolation="nearest")
            ax.set_facecolor("black" if r < 2 else "white")
            if r == 0:
                bad = st.excluded[i]
                ax.set_title(_slice_label(st, i) + (" (excluded)" if bad else ""), fontsize=8,
                             color=EXCLUDED_COLOUR if bad else "black")
            if c == 0:
                ax.set_ylabel(name)
    fig.colorbar(ims[0], ax=list(axes[:2].ravel()), shrink=0.8, label="intensity")
    if ims[2] is not None:
        fig.colorbar(ims[2], ax=list(axes[2]), shrink=0.8, label="difference")
    fig.suptitle(f"{st.name}: acquired and simulated slices (stack voxel axes i to the right, j up; "
                 f"{st.spacing[0]:g} x {st.spacing[1]:g} mm pixels)", fontsize=10)
    return fig


def fig_stack_reslice(st: StackReport):
    """Through-plane cuts of the stack in its own voxel grid, acquired against simulated."""
    bi, bj = _bbox(st.mask)
    order = np.argsort(st.index)
    lo, hi = _window(st.acquired[st.mask])
    counts_j = st.mask.sum((0, 1))
    counts_i = st.mask.sum((0, 2))
    jc = int(np.argmax(counts_j)) if counts_j.any() else st.mask.shape[2] // 2
    ic = int(np.argmax(counts_i)) if counts_i.any() else st.mask.shape[1] // 2
    cuts = [(f"cut at j = {jc}", lambda a: a[order][:, bi, jc], st.spacing[0], "i"),
            (f"cut at i = {ic}", lambda a: a[order][:, ic, bj], st.spacing[1], "j")]
    zs = st.slice_spacing
    kmin, kmax = int(st.index.min()), int(st.index.max())
    fig = _figure(13, 4.2)
    axes = np.asarray(fig.subplots(1, 4, squeeze=False))
    im = None
    for c, (label, take, sp, ax_name) in enumerate(cuts):
        m = take(st.mask)
        for r, (name, arr) in enumerate((("acquired", st.acquired), ("simulated", st.simulated))):
            ax = axes[0, 2 * c + r]
            img = np.where(m, take(arr), np.nan)
            ext = [0, img.shape[1] * sp, (kmin - 0.5) * zs, (kmax + 0.5) * zs]
            im = ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi, extent=ext, aspect="equal",
                           interpolation="nearest")
            ax.set_facecolor("black")
            ax.set_title(f"{name}, {label}", fontsize=9)
            ax.set_xlabel(f"{ax_name} (mm)")
            ax.set_ylabel("k x slice spacing (mm)")
    fig.colorbar(im, ax=list(axes.ravel()), shrink=0.8, label="intensity")
    fig.suptitle(f"{st.name}: through-plane view in the stack's voxel grid (motion shows as jagged edges; "
                 f"simulated at the estimated poses)", fontsize=10)
    return fig


def _x_axis(st: StackReport) -> tuple[np.ndarray, str]:
    if st.order is not None:
        return np.asarray(st.order, dtype=float), "acquisition order (time index in the stack)"
    return np.asarray(st.index, dtype=float), "slice index k in the file (acquisition order unknown)"


def _mark_excluded(ax, x: np.ndarray, st: StackReport) -> None:
    for xi in x[st.excluded]:
        ax.axvspan(xi - 0.5, xi + 0.5, color=EXCLUDED_COLOUR, alpha=0.15, lw=0)


def fig_stack_motion(st: StackReport):
    """Rotation angle and translation (slice axes u, v, w) relative to the header pose."""
    x, xlabel = _x_axis(st)
    ang, t = slice_motion(st.header_poses, st.poses)
    ok = st.has_pixels
    srt = np.argsort(x)
    fig = _figure(11, 5.2)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(x[srt], np.where(ok, ang, np.nan)[srt], "o-", ms=3, color="#1f77b4")
    ax1.set_ylabel("rotation angle (deg)")
    ax1.set_ylim(bottom=0)
    for c, (name, col) in enumerate((("u (in plane, along i)", "#2ca02c"), ("v (in plane, along j)", "#9467bd"),
                                     ("w (through plane)", "#ff7f0e"))):
        ax2.plot(x[srt], np.where(ok, t[:, c], np.nan)[srt], "o-", ms=3, label=name, color=col)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set_ylabel("translation (mm)")
    ax2.set_xlabel(xlabel)
    ax2.legend(fontsize=8, ncol=3, loc="best")
    for ax in (ax1, ax2):
        _mark_excluded(ax, x, st)
        ax.grid(alpha=0.3)
    n_ex = int(st.excluded.sum())
    fig.suptitle(f"{st.name}: estimated slice motion relative to the header pose"
                 + (f" (red bands: {n_ex} excluded slices)" if n_ex else ""), fontsize=10)
    return fig


def fig_outliers(data: ReportData):
    """Per stack: slice weights (excluded in red) and per-slice NCC before/after."""
    S = len(data.stacks)
    fig = _figure(12, 2.3 * S + 0.6)
    axes = np.asarray(fig.subplots(S, 2, squeeze=False))
    for s, st in enumerate(data.stacks):
        x, xlabel = _x_axis(st)
        ok = st.has_pixels
        ax = axes[s, 0]
        kept = ok & ~st.excluded
        ax.bar(x[kept], st.weights[kept], width=0.8, color="#1f77b4", label="slice weight")
        if st.excluded.any():
            ax.bar(x[st.excluded], st.weights[st.excluded], width=0.8, color=EXCLUDED_COLOUR, label="excluded")
            ax.plot(x[st.excluded], st.weights[st.excluded], "x", color=EXCLUDED_COLOUR, ms=7)
        if st.pixel_weight is not None:
            ax.plot(x[ok], st.pixel_weight[ok], "k.", ms=4, label="mean pixel weight")
        ax.axhline(EXCLUDED_BELOW, color=EXCLUDED_COLOUR, ls="--", lw=0.8)
        ax.set_ylim(0, 1.35)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_ylabel("weight")
        ax.set_title(f"{st.name}: robust weights ({int(st.excluded.sum())} of {int(ok.sum())} slices excluded)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=3)
        ax = axes[s, 1]
        srt = np.argsort(x)
        if st.ncc_before is not None:
            ax.plot(x[srt], np.where(ok, st.ncc_before, np.nan)[srt], "o-", ms=3, color="grey", label="before")
        ax.plot(x[srt], np.where(ok, st.ncc_after, np.nan)[srt], "o-", ms=3, color="#1f77b4", label="after")
        if st.excluded.any():
            ax.scatter(x[st.excluded], st.ncc_after[st.excluded], s=40, facecolors="none",
                       edgecolors=EXCLUDED_COLOUR, label="excluded", zorder=3)
        ax.set_ylabel("per-slice NCC")
        ax.set_title(f"{st.name}: acquired vs simulated, per slice", fontsize=9)
        ax.legend(fontsize=7, loc="best", ncol=3)
        for a in axes[s]:
            a.grid(alpha=0.3)
            a.set_xlabel(xlabel, fontsize=8)
    return fig


def fig_consistency(data: ReportData):
    """NCC and SSIM per stack before/after, and per-slice NCC before against after."""
    names = [f"{s}: {st.name}" if len(st.name) <= 18 else f"{s}: {st.name[:16]}..." for s, st in enumerate(data.stacks)]
    fig = _figure(13, 4.4)
    axes = fig.subplots(1, 3)
    xs = np.arange(len(names) + 1)
    labels = ["all"] + names
    for ax, key in zip(axes[:2], ("ncc", "ssim")):
        for off, which, col in ((-0.2, "before", "grey"), (0.2, "after", "#1f77b4")):
            overall = getattr(data, which)
            vals = [overall.get(key, np.nan) if overall else np.nan]
            vals += [(getattr(st, which) or {}).get(key, np.nan) for st in data.stacks]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(xs + off, vals, width=0.4, color=col, label=which)
        ax.set_xticks(xs, labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(key.upper())
        ax.set_ylim(0, 1.15)
        ax.set_title(f"{key.upper()}, acquired vs simulated slices", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=2)
        ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    have_before = any(st.ncc_before is not None for st in data.stacks)
    for s, st in enumerate(data.stacks):
        ok = st.has_pixels & np.isfinite(st.ncc_after)
        if have_before and st.ncc_before is not None:
            ax.scatter(st.ncc_before[ok], st.ncc_after[ok], s=10, label=names[s])
            ex = st.excluded & ok
            ax.scatter(st.ncc_before[ex], st.ncc_after[ex], s=40, facecolors="none", edgecolors=EXCLUDED_COLOUR)
        else:
            ax.hist(st.ncc_after[ok], bins=20, alpha=0.5, label=names[s])
    if have_before:
        lo = np.nanmin([np.nanmin(np.r_[st.ncc_before, st.ncc_after]) for st in data.stacks if st.ncc_before is not None])
        lo = min(lo, 0.9) if np.isfinite(lo) else 0.0
        ax.plot([lo, 1], [lo, 1], color="grey", lw=0.8)
        ax.set_xlabel("per-slice NCC before (header poses, PSF average)")
        ax.set_ylabel("per-slice NCC after")
        ax.set_title("per slice (red rings: excluded)", fontsize=9)
    else:
        ax.set_xlabel("per-slice NCC after")
        ax.set_ylabel("slices")
        ax.set_title("per-slice NCC (no 'before' values recorded)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig
