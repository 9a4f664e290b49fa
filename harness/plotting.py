"""PNG plots of results: ``harness plot RESULT`` or ``harness run --plot``.

Each metric draws its own figures in ``Metric.plot``; this module holds the shared drawing helpers
and updates the result file's ``artifacts`` (atomically) with the paths written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from harness.errors import HarnessError
from harness.results import (
    Result,
    SamplesFile,
    atomic_write_text,
    check_run_id,
    is_safe_relative_path,
    read_result,
    result_json,
    sibling_path,
)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def artifact_path(out_dir: Path, run_id: str, name: str) -> tuple[Path, str]:
    """(absolute path to write, path relative to the result file) of artifact ``name`` of a run.

    ``run_id`` must be a plain file name and ``name`` a relative path (the artifact stays in the run's folder).
    """
    if not is_safe_relative_path(name):
        raise HarnessError(f"artifact name {name!r} is not a relative path inside the run's folder")
    relative = f"{check_run_id(run_id)}/{name}"
    path = Path(out_dir) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, relative


def plot_curves(path: Path, curves: Mapping[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str) -> None:
    """Line plot of one or more curves sampled at evenly spaced fractions 0..1."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for label, ys in curves.items():
        xs = [i / max(1, len(ys) - 1) for i in range(len(ys))]
        ax.plot(xs, ys, label=label, linewidth=1.8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1))
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def normalise_map(attribution: torch.Tensor) -> torch.Tensor:
    """Scale a map to [0, 1] between its minimum and its 99th percentile (for display only)."""
    flat = attribution.flatten().float()
    low, high = flat.min(), torch.quantile(flat[:: max(1, flat.numel() // 100000)], 0.99)
    return ((attribution - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)


def plot_overlays(path: Path, panels: list[tuple[str, torch.Tensor, torch.Tensor]], *, title: str) -> None:
    """For each (label, image (3, H, W) in [0, 1], map (H, W)): the image and the map over it."""
    plt = pyplot()
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.4), dpi=110, squeeze=False)
    for col, (label, image, attribution) in enumerate(panels):
        picture = image.permute(1, 2, 0).clamp(0, 1).numpy()
        axes[0, col].imshow(picture)
        axes[0, col].set_title(label, fontsize=8)
        axes[1, col].imshow(picture)
        axes[1, col].imshow(normalise_map(attribution).numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for row in (0, 1):
            axes[row, col].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_result(path: Path) -> dict[str, str]:
    """Draw the plots of the result file at ``path``; record and return their relative paths.

    The result is validated first (its run id is a plain file name), so every file written stays in
    ``<folder of path>/<run_id>/``; the result file itself is updated in place.
    """
    from harness.registry import get_registry

    path = Path(path)
    result: Result = read_result(path)
    run_id = check_run_id(result.run_id)
    metric_cls = get_registry().get("metric", result.metric.id)
    metric = metric_cls(metric_cls.Options(**result.metric.options))
    records = SamplesFile(sibling_path(path, run_id, ".samples.jsonl")).read()
    folder = path.parent / run_id
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = metric.plot(result, records, path.parent) or {}
    if written:
        result.artifacts.update(written)
        updated = Result.model_validate(result.model_dump())  # artifact paths checked before anything is recorded
        atomic_write_text(path, result_json(updated))
    return dict(written)
