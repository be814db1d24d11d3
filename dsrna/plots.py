"""Pictures of architectures with matplotlib alone (no graphviz): a cell's DAG and heatmaps of
softmax(alpha). Every function writes one PNG atomically and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsrna.search.checkpoint import atomic_write  # noqa: E402
from dsrna.space.genotype import PRIMITIVES, Genotype  # noqa: E402

_OP_COLOURS = {
    "max_pool_3x3": "#4c72b0", "avg_pool_3x3": "#64b5cd", "skip_connect": "#8c8c8c",
    "sep_conv_3x3": "#dd8452", "sep_conv_5x5": "#c44e52", "dil_conv_3x3": "#55a868", "dil_conv_5x5": "#2f7d4a",
}


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG through a temporary file and a rename (as every run file), then close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _node_positions(steps: int) -> dict[int, tuple[float, float]]:
    """Inputs on the left, intermediate nodes staggered in the middle, the output on the right."""
    pos = {0: (0.0, 1.0), 1: (0.0, -1.0)}
    for i in range(steps):
        pos[2 + i] = (1.3 * (1.0 + i), 1.3 if i % 2 == 0 else -1.3)
    pos[-1] = (1.3 * (steps + 1.0), 0.0)
    return pos


def plot_cell(genotype: Genotype, reduction: bool, path: str | Path, title: str | None = None) -> Path:
    """The normal (or reduction) cell of ``genotype`` as a DAG with one labelled arrow per op."""
    edges = genotype.reduce if reduction else genotype.normal
    concat = genotype.reduce_concat if reduction else genotype.normal_concat
    steps = len(edges) // 2
    pos = _node_positions(steps)
    names = {0: "c_{k-2}", 1: "c_{k-1}", -1: "c_{k}"}
    fig, ax = plt.subplots(figsize=(2.4 + 2.0 * steps, 4.0))
    for k, (op, source) in enumerate(edges):
        target = 2 + k // 2
        (x0, y0), (x1, y1) = pos[source], pos[target]
        colour = _OP_COLOURS.get(op, "black")
        bend = 0.25 if k % 2 else -0.25
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.6, shrinkA=14, shrinkB=14,
                                    connectionstyle=f"arc3,rad={bend}"))
        # label near the target: each node has exactly two incoming edges, so labels do not pile up
        mx, my = x0 + 0.68 * (x1 - x0), y0 + 0.68 * (y1 - y0) + bend * 0.5 * (1 if x1 >= x0 else -1)
        ax.text(mx, my, op, fontsize=7, color=colour, ha="center", va="center",
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    for node in concat:
        (x0, y0), (x1, y1) = pos[node], pos[-1]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color="#bbbbbb", lw=1.0, shrinkA=14, shrinkB=14, ls="--"))
    for node, (x, y) in pos.items():
        is_io = node in (0, 1, -1)
        ax.scatter([x], [y], s=900, zorder=3, color="#f0e0b0" if is_io else "#cfe2f3", edgecolors="black")
        ax.text(x, y, f"${names[node]}$" if is_io else str(node - 2), ha="center", va="center", zorder=4, fontsize=9)
    ax.set_title(title or ("reduction cell" if reduction else "normal cell"))
    ax.set_xlim(-0.6, 1.3 * (steps + 1) + 0.6)
    ax.set_ylim(-2.0, 2.0)
    ax.axis("off")
    return save_figure(fig, path)


def edge_labels(steps: int) -> list[str]:
    """``"j->i"`` for every edge of a cell, in the row order of the alpha tables."""
    return [f"{j}->{2 + i}" for i in range(steps) for j in range(2 + i)]


def plot_alpha_heatmaps(tables: dict[str, torch.Tensor | np.ndarray], path: str | Path,
                        title: str | None = None, columns: Sequence[str] = PRIMITIVES) -> Path:
    """One heatmap per ``name -> [edges, ops]`` table (e.g. softmax(alpha) of the normal and the
    reduction cell), rows labelled by edge, columns by op, with the values written in."""
    fig, axes = plt.subplots(1, len(tables), figsize=(5.6 * len(tables), 5.0), squeeze=False, layout="constrained")
    for ax, (name, table) in zip(axes[0], tables.items()):
        values = table.detach().float().cpu().numpy() if isinstance(table, torch.Tensor) else np.asarray(table)
        steps = int(round((-3 + (9 + 8 * values.shape[0]) ** 0.5) / 2))  # rows = steps * (steps + 3) / 2
        image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(values.max()), 1e-8))
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(values.shape[0]), edge_labels(steps)[: values.shape[0]], fontsize=7)
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                    color="white" if v < 0.6 * values.max() else "black")
        ax.set_title(name)
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
