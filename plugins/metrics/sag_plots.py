"""Pictures of MSEs and of the sub-explanation tree, like SAG's figures (matplotlib, no graphviz)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.plotting import pyplot
from harness.regions import Granularity


def masked_picture(visual: dict[str, torch.Tensor], patches: list[int], grid: int) -> Any:
    """(H, W, 3) numpy picture showing only ``patches`` of the image (the rest: the baseline)."""
    image, baseline = visual["image"], visual.get("baseline", torch.zeros_like(visual["image"]))
    _, height, width = image.shape
    granularity = Granularity("grid", grid, height, width)
    keep = torch.zeros(1, granularity.n_regions)
    if patches:
        keep[0, patches] = 1.0
    mask = granularity.render(keep)[0]
    return (mask * image + (1 - mask) * baseline).permute(1, 2, 0).clamp(0, 1).numpy()


def plot_mses(path: Path, visual: dict[str, torch.Tensor], record: dict[str, Any], grid: int) -> None:
    """The image, then every MSE shown on it with its relative confidence."""
    plt = pyplot()
    mses = record["values"]["mses"]
    n = len(mses) + 1
    cols = min(n, 6)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows), dpi=110, squeeze=False)
    axes[0, 0].imshow(visual["image"].permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0, 0].set_title(f"{record['sample_id']} (class {record['values']['target']})", fontsize=7)
    for k, mse in enumerate(mses, start=1):
        ax = axes[k // cols, k % cols]
        ax.imshow(masked_picture(visual, mse["patches"], grid))
        ax.set_title(f"MSE {k}: {len(mse['patches'])} patches, {mse['relative']:.2f}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"minimal sufficient explanations (p0 = {record['values']['p0']:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


THUMB_IN = 1.15  # thumbnail side, inches
GAP_X_IN = 0.25  # horizontal gap between thumbnails
ROW_IN = 1.95  # thumbnail + label + connector per tree level


def plot_tree(path: Path, visual: dict[str, torch.Tensor], record: dict[str, Any], grid: int) -> None:
    """For the first MSEs: the MSE, its one-patch deletions and the best two-patch deletion below each,
    drawn as masked images with their relative confidence (faded below 0.5).

    Thumbnails have a fixed size in inches (the figure grows with the widest MSE, so a 12-patch MSE
    stays legible), labels sit under their picture, and connectors run between label and picture.
    """
    plt = pyplot()
    trees = record["values"]["tree"]
    columns = max([len(t["children"]) for t in trees] + [3])
    width_in = columns * (THUMB_IN + GAP_X_IN) + GAP_X_IN
    header_in = 0.45
    height_in = header_in + len(trees) * (3 * ROW_IN + 0.35)
    fig = plt.figure(figsize=(width_in, height_in), dpi=100)

    def box(x_in: float, top_in: float) -> tuple[float, float, float, float]:
        """Figure coordinates of a thumbnail centred at x_in whose top is top_in below the figure top."""
        return ((x_in - THUMB_IN / 2) / width_in, 1 - (top_in + THUMB_IN) / height_in, THUMB_IN / width_in, THUMB_IN / height_in)

    def connect(x0_in: float, y0_in: float, x1_in: float, y1_in: float) -> None:
        _edge(fig, x0_in / width_in, 1 - y0_in / height_in, x1_in / width_in, 1 - y1_in / height_in)

    label_in = 0.32  # space under a thumbnail for its label
    for row, tree in enumerate(trees):
        top = header_in + row * (3 * ROW_IN + 0.35)
        centre = width_in / 2
        _thumb(fig, box(centre, top), visual, tree["patches"], grid,
               f"MSE ({len(tree['patches'])} patches): {tree['relative']:.2f}", bold=True)
        children = tree["children"]
        xs = [GAP_X_IN + (THUMB_IN + GAP_X_IN) * (k + 0.5) + (columns - len(children)) * (THUMB_IN + GAP_X_IN) / 2
              for k in range(len(children))]
        for x, child in zip(xs, children):
            patches = [p for p in tree["patches"] if p != child["removed"]]
            connect(centre, top + THUMB_IN + label_in, x, top + ROW_IN)
            _thumb(fig, box(x, top + ROW_IN), visual, patches, grid, f"-{child['removed']}: {child['relative']:.2f}",
                   faded=child["relative"] < 0.5)
            for g in sorted(child["children"], key=lambda g: -g["relative"])[:1]:
                grand = [p for p in patches if p != g["removed"]]
                connect(x, top + ROW_IN + THUMB_IN + label_in, x, top + 2 * ROW_IN)
                _thumb(fig, box(x, top + 2 * ROW_IN), visual, grand, grid, f"-{g['removed']}: {g['relative']:.2f}",
                       faded=g["relative"] < 0.5)
    fig.text(0.5 * GAP_X_IN / width_in, 1 - 0.12 / height_in,
             f"{record['sample_id']}: sub-explanation tree (relative confidence p/p0; -k: patch k removed; "
             "below each deletion its best further deletion; faded < 0.5)", fontsize=9, va="top")
    fig.savefig(path)
    plt.close(fig)


def _thumb(fig, rect, visual, patches, grid, label, bold=False, faded=False) -> None:
    ax = fig.add_axes(rect)
    ax.imshow(masked_picture(visual, patches, grid), alpha=0.45 if faded else 1.0)
    ax.set_xlabel(label, fontsize=8, fontweight="bold" if bold else "normal", labelpad=2)
    ax.set_xticks([])
    ax.set_yticks([])


def _edge(fig, x0, y0, x1, y1) -> None:
    fig.add_artist(pyplot().Line2D([x0, x1], [y0, y1], transform=fig.transFigure, color="0.6", linewidth=0.8))
