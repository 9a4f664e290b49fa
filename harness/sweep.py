"""Perturbation sweeps (insertion, deletion, MoRF, LeRF): all steps of all images, batched.

Regions are ranked by their attribution (ties by region index). Step k of S moves the first
``round(k * R / S)`` regions of that order: inserted into the baseline (insertion), or removed into
the baseline (deletion). Every (image, step) composite ``M * x + (1 - M) * baseline`` is built
chunk by chunk and evaluated in fixed-size forward passes across images and steps; the points whose
mask keeps the whole image reuse the clean score instead of another forward pass.
"""

from __future__ import annotations

from typing import Literal

import torch

from harness.batching import map_in_chunks
from harness.model import LoadedModel
from harness.regions import Granularity, ranks
from harness.scoring import ScoreKind, target_scores


def step_counts(n_regions: int, steps: int) -> torch.Tensor:
    """How many regions are moved at each of the ``steps + 1`` points (0 ... n_regions)."""
    return torch.round(torch.arange(steps + 1, dtype=torch.float64) * n_regions / steps).long()


def perturbation_curves(
    model: LoadedModel,
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    attribution: torch.Tensor,
    granularity: Granularity,
    *,
    steps: int,
    mode: Literal["insert", "remove"],
    order: Literal["most", "least"] = "most",
    target: torch.Tensor,
    score: ScoreKind = "softmax",
    clean_scores: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """(B, steps + 1) scores of ``target`` along the sweep.

    ``mode="insert"`` starts from ``baseline`` and adds regions; ``"remove"`` starts from ``inputs``
    and removes them. ``order`` says which regions go first: the most or the least important.
    """
    n_images = len(inputs)
    scores = granularity.region_scores(attribution)
    rank = ranks(scores if order == "most" else -scores)
    counts = step_counts(granularity.n_regions, steps).to(inputs.device)
    n_regions = granularity.n_regions
    moved_all = counts == n_regions
    keeps_all = moved_all if mode == "insert" else counts == 0
    curves = torch.empty(n_images, steps + 1, device=inputs.device)
    pairs = [(b, k) for b in range(n_images) for k in range(steps + 1) if not (clean_scores is not None and keeps_all[k])]
    if clean_scores is not None:
        curves[:, keeps_all] = clean_scores.to(curves).view(-1, 1)
    if not pairs:
        return curves
    image_index = torch.tensor([b for b, _ in pairs], device=inputs.device)
    step_index = torch.tensor([k for _, k in pairs], device=inputs.device)

    def chunk(start: int, stop: int) -> torch.Tensor:
        b, k = image_index[start:stop], step_index[start:stop]
        moved = rank[b] < counts[k].view(-1, 1)
        keep = moved if mode == "insert" else ~moved
        mask = granularity.render(keep).to(inputs.dtype)
        composite = mask * inputs[b] + (1 - mask) * baseline[b]
        return target_scores(model.module(composite), target[b], score)

    with torch.inference_mode():
        values = map_in_chunks(len(pairs), chunk_size or model.batch_size, chunk)
    curves[image_index, step_index] = values
    return curves
