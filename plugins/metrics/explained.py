"""The shared first step of the map metrics: a batch's inputs, clean logits, targets and the run
attributor's maps, with the maps kept for the plots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .insertion_deletion import choose_targets

__all__ = ["Explained", "explain", "keep_maps"]


@dataclass
class Explained:
    """What :func:`explain` computed for one batch."""

    inputs: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor
    maps: torch.Tensor


def explain(batch: Any, ctx: Any, target_kind: str, attributor: Any = None) -> Explained:
    """Inputs, clean logits, targets (``predicted`` or ``label``) and maps of ``batch`` (by
    ``attributor``, default the run's), the maps kept for the plots."""
    model = ctx.model
    inputs = batch.inputs(model)
    logits = model.logits(inputs)
    target = choose_targets(logits, batch.labels, target_kind)
    maps = (attributor or ctx.attributor).attribute(model, inputs, target, batch.seeds)
    keep_maps(ctx, batch, inputs, maps)
    return Explained(inputs, logits, target, maps)


def keep_maps(ctx: Any, batch: Any, inputs: torch.Tensor, maps: torch.Tensor) -> None:
    """Keep every sample's picture and map for the metric's plots."""
    model = ctx.model
    for i, sample in enumerate(batch.samples):
        ctx.keep_visual(sample.id, image=model.denormalise(inputs[i : i + 1])[0].clamp(0, 1), attribution=maps[i])
