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


def plot_tree(path: Path, visual: dict[str, torch.Tensor], record: dict[str, Any], grid: int) -> None:
    """For the first MSEs: the MSE, its one-patch deletions and their best two-patch deletions,
    each drawn as the masked image with its relative confidence (edges: the removed patch)."""
    plt = pyplot()
    trees = record["values"]["tree"]
    width = max(len(t["children"]) for t in trees) if trees else 1
    fig = plt.figure(figsize=(1.5 * max(width, 3), 3.3 * len(trees)), dpi=100)
    for row, tree in enumerate(trees):
        top = 1 - row / len(trees)
        band = 1 / len(trees)
        _thumb(fig, visual, tree["patches"], grid, 0.5, top - 0.07 * band, band, f"MSE {tree['relative']:.2f}", bold=True)
        children = tree["children"]
        for k, child in enumerate(children):
            x = (k + 0.5) / len(children)
            patches = [p for p in tree["patches"] if p != child["removed"]]
            _edge(fig, 0.5, top - 0.33 * band, x, top - 0.42 * band)
            _thumb(fig, visual, patches, grid, x, top - 0.42 * band, band, f"-{child['removed']}: {child['relative']:.2f}",
                   faded=child["relative"] < 0.5)
            best = sorted(child["children"], key=lambda g: -g["relative"])[:1]
            for g in best:
                grand = [p for p in patches if p != g["removed"]]
                _edge(fig, x, top - 0.70 * band, x, top - 0.74 * band)
                _thumb(fig, visual, grand, grid, x, top - 0.74 * band, band, f"-{g['removed']}: {g['relative']:.2f}",
                       faded=g["relative"] < 0.5)
    fig.text(0.01, 0.995, f"{record['sample_id']}: sub-explanation tree (relative confidence; faded < 0.5)",
             fontsize=8, va="top")
    fig.savefig(path)
    plt.close(fig)


def _thumb(fig, visual, patches, grid, x, top, band, label, bold=False, faded=False) -> None:
    size = 0.25 * band
    aspect = fig.get_figheight() / fig.get_figwidth()
    w = size * aspect
    ax = fig.add_axes((x - w / 2, top - size, w, size))
    ax.imshow(masked_picture(visual, patches, grid), alpha=0.45 if faded else 1.0)
    ax.set_title(label, fontsize=6, fontweight="bold" if bold else "normal")
    ax.set_xticks([])
    ax.set_yticks([])


def _edge(fig, x0, y0, x1, y1) -> None:
    fig.add_artist(pyplot().Line2D([x0, x1], [y0, y1], transform=fig.transFigure, color="0.6", linewidth=0.8))
