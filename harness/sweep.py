"""Perturbation sweeps (insertion, deletion, MoRF, LeRF): all steps of all images, batched.

Regions are ranked by their attribution (ties by region index). Step k of S moves the first
``round(k * R / S)`` regions of that order: inserted into the baseline (insertion), or removed into
the baseline (deletion). Every (image, step) composite ``M * x + (1 - M) * baseline`` is built
chunk by chunk and evaluated in fixed-size forward passes across images and steps; the points whose
mask keeps the whole image reuse the clean score instead of another forward pass.

The composites of a chunk are written into one reusable buffer, image by image (a chunk's rows are
consecutive steps of a few images, so each image's tensors broadcast over its rows; nothing is
gathered per row). For hard masks (``pixel``, ``patch:P``) the composite is a per-pixel choice
between image and baseline, built with ``torch.lerp`` and a 0/1 weight, which returns exactly the
image or the baseline (ATen's lerp evaluates ``start + w * (end - start)`` for w < 0.5 and
``end - (end - start) * (1 - w)`` otherwise), the same values as ``M * x + (1 - M) * baseline``;
one pixel-level rank map per image replaces rendering a mask per row. Soft masks (``grid:G``) are
rendered per chunk and blended with the formula itself, so every sweep gives the same numbers as
the per-row formula.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from harness.batching import map_in_chunks
from harness.model import LoadedModel
from harness.regions import Granularity, ranks
from harness.scoring import ScoreKind, target_scores


def step_counts(n_regions: int, steps: int) -> torch.Tensor:
    """How many regions are moved at each of the ``steps + 1`` points (0 ... n_regions)."""
    return torch.round(torch.arange(steps + 1, dtype=torch.float64) * n_regions / steps).long()


def pixel_ranks(granularity: Granularity, rank: torch.Tensor) -> torch.Tensor | None:
    """(B, H*W) rank of the region each pixel belongs to, for hard granularities (None for soft ones)."""
    if granularity.kind == "pixel":
        return rank
    if granularity.kind == "patch":
        return rank[:, granularity._patch_index.to(rank.device)]
    return None


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
    fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, steps + 1) scores of ``target`` along the sweep.

    ``mode="insert"`` starts from ``baseline`` and adds regions; ``"remove"`` starts from ``inputs``
    and removes them. ``order`` says which regions go first: the most or the least important.
    ``fill`` (a masker's ``composite_fill``, for fills that depend on which pixels are removed, such as
    ROAD's imputation) gets each chunk's composites, their keep masks (N, 1, H, W; 1 = image pixel)
    and the image index of every row, and returns the composites to score.
    """
    n_images = len(inputs)
    device = inputs.device
    scores = granularity.region_scores(attribution)
    rank = ranks(scores if order == "most" else -scores).to(device)
    counts = step_counts(granularity.n_regions, steps)
    moved_all = counts == granularity.n_regions
    keeps_all = moved_all if mode == "insert" else counts == 0
    curves = torch.empty(n_images, steps + 1, device=device)
    if clean_scores is not None:
        curves[:, keeps_all.to(device)] = clean_scores.to(curves).view(-1, 1)
        evaluated = torch.nonzero(~keeps_all).flatten()
    else:
        evaluated = torch.arange(steps + 1)
    per_image = len(evaluated)
    if per_image == 0 or n_images == 0:
        return curves
    moved_counts = counts[evaluated].to(device).view(-1, 1)  # (per_image, 1): regions moved at each evaluated step
    image_of_row = torch.arange(n_images, device=device).repeat_interleave(per_image)
    hard = pixel_ranks(granularity, rank)
    if hard is not None and granularity.n_regions <= 2**24:  # exact in float32: compare straight into the weights
        hard = hard.float()
        moved_counts = moved_counts.float()
    height, width = inputs.shape[-2:]
    buffer: list[torch.Tensor] = []

    def composites(start: int, stop: int) -> torch.Tensor:
        if not buffer or len(buffer[0]) < stop - start:  # composites (and hard masks), reused by every chunk
            buffer[:] = [torch.empty((stop - start, *inputs.shape[1:]), dtype=inputs.dtype, device=device)]
            if hard is not None:
                buffer.append(torch.empty((stop - start, 1, height, width), dtype=inputs.dtype, device=device))
        out = buffer[0][: stop - start]
        soft = None
        if hard is None:  # soft tents: render the chunk's masks in one call, blend with the formula
            b = image_of_row[start:stop]
            steps_of_row = torch.arange(start, stop, device=device) % per_image
            moved = rank[b] < moved_counts[steps_of_row]
            soft = granularity.render(moved if mode == "insert" else ~moved).to(inputs.dtype)
        row = start
        while row < stop:
            image, first = divmod(row, per_image)
            last = min(per_image, first + stop - row)
            rows = slice(row - start, row - start + last - first)
            x, base = inputs[image], baseline[image]
            if soft is None:  # 1 where the region is moved: lerp returns exactly end (moved) or start
                assert hard is not None  # soft is rendered exactly when there are no hard ranks
                moved = buffer[1][: stop - start][rows]
                torch.lt(hard[image], moved_counts[first:last], out=moved.view(-1, height * width))
                start_, end_ = (base, x) if mode == "insert" else (x, base)
                torch.lerp(start_, end_, moved, out=out[rows])
            else:
                mask, segment = soft[rows], out[rows]
                torch.mul(mask, x, out=segment)
                segment.add_((1 - mask) * base)
            row += last - first
        if fill is not None:
            keep = soft if soft is not None else buffer[1][: stop - start]
            out = fill(out, keep if soft is not None or mode == "insert" else 1 - keep, image_of_row[start:stop])
        return out

    forward = model.forward_module()

    def chunk(start: int, stop: int) -> torch.Tensor:
        return target_scores(forward(composites(start, stop)), target[image_of_row[start:stop]], score)

    with torch.inference_mode():
        values = map_in_chunks(n_images * per_image, chunk_size or model.batch_size, chunk)
    curves[:, evaluated.to(device)] = values.to(curves).view(n_images, per_image)
    return curves
