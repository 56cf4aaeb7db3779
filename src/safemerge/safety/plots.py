"""Heatmap of per-layer safety similarity: blocks (rows) × module names (columns), coloured by ρ.

Cells with ρ < τ (the layers SafeMERGE merges) are marked with a cross; modules an input does
not adapt are left blank. One panel per scanned input. Uses matplotlib's Agg backend (no display).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from safemerge.methods.safety_params import safemerge_merges
from safemerge.safety.deltas import MODULE_ORDER
from safemerge.safety.selection import LayerScore


def heatmap(scores: list[LayerScore], path: str | Path, *, tau: float | None = None, title: str | None = None) -> Path:
    """Write a PNG heatmap of ``scores`` to ``path`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(s.source for s in scores))

    names = sorted(dict.fromkeys(s.name for s in scores),
                   key=lambda n: (MODULE_ORDER.get(n.rsplit(".", 1)[-1], len(MODULE_ORDER)), n))
    layers = sorted({-1 if s.layer is None else s.layer for s in scores})
    li = {l: i for i, l in enumerate(layers)}
    ni = {n: i for i, n in enumerate(names)}

    def row(s: LayerScore) -> int:
        return li[-1 if s.layer is None else s.layer]

    width = max(4.0, 1.1 * len(names) * len(sources) + 1.5)
    height = max(3.0, 0.28 * len(layers) + 1.8)
    fig, axes = plt.subplots(1, len(sources), figsize=(width, height), squeeze=False)
    im = None
    for ax, src in zip(axes[0], sources):
        grid = np.full((len(layers), len(names)), np.nan)
        panel = [s for s in scores if s.source == src]
        for s in panel:
            grid[row(s), ni[s.name]] = s.rho
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        if tau is not None:
            marked = [s for s in panel if safemerge_merges(s.rho, tau)]
            xs, ys = [ni[s.name] for s in marked], [row(s) for s in marked]
            ax.scatter(xs, ys, marker="x", c="red", s=30, linewidths=1.2, label=f"ρ < τ = {tau:g}")
            if len(xs):
                ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step))
        ax.set_yticklabels([("—" if layers[i] < 0 else str(layers[i])) for i in range(0, len(layers), step)],
                           fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(src, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="ρ = cos(CΔW, ΔW)", fraction=0.04)
    fig.suptitle(title or "safety similarity per layer" + (f" (× = merged, ρ < {tau:g})" if tau is not None else ""),
                 fontsize=10)
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out
