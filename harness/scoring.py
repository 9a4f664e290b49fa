"""Target scores and their input gradients, evaluated in fixed-size chunks."""

from __future__ import annotations

from typing import Callable, Literal

import torch

from harness.batching import map_in_chunks
from harness.model import LoadedModel

ScoreKind = Literal["softmax", "logit"]


def target_scores(logits: torch.Tensor, target: torch.Tensor, kind: ScoreKind) -> torch.Tensor:
    """Per-row score of ``target``: its softmax probability or its logit."""
    values = logits.float().softmax(-1) if kind == "softmax" else logits.float()
    return values.gather(1, target.view(-1, 1).to(values.device)).squeeze(1)


def input_gradients(
    model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, kind: ScoreKind = "logit"
) -> torch.Tensor:
    """d score(target) / d input for every row of ``inputs``, one forward+backward per chunk."""

    forward = model.forward_module()

    def chunk(start: int, stop: int) -> torch.Tensor:
        x = inputs[start:stop].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            scores = target_scores(forward(x), target[start:stop], kind)
            (grad,) = torch.autograd.grad(scores.sum(), x)
        return grad

    return map_in_chunks(len(inputs), model.batch_size, chunk)


def accumulate_gradients(
    model: LoadedModel,
    n_images: int,
    n_samples: int,
    make_rows: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    reduce_row: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    kind: ScoreKind = "logit",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over ``n_samples`` per image of ``reduce_row(grad, x)``, all samples in the batch dimension.

    The ``n_images * n_samples`` rows (image-major) are built chunk by chunk by
    ``make_rows(image_index, sample_index) -> (inputs, targets)`` and evaluated in forward+backward
    passes of ``model.batch_size`` rows; ``weights[sample]`` scales each sample's contribution.
    """
    total = n_images * n_samples
    out: torch.Tensor | None = None
    start, size = 0, max(1, model.batch_size)
    forward = model.forward_module()
    while start < total:
        stop = min(total, start + size)
        rows = torch.arange(start, stop)
        image_index, sample_index = rows // n_samples, rows % n_samples
        try:
            x, target = make_rows(image_index, sample_index)
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                scores = target_scores(forward(x), target, kind)
                (grad,) = torch.autograd.grad(scores.sum(), x)
        except Exception as exc:
            from harness.batching import is_out_of_memory

            if not is_out_of_memory(exc) or size == 1:
                raise
            size //= 2
            continue
        contribution = reduce_row(grad.detach(), x.detach())
        if weights is not None:
            w = weights.to(contribution)[sample_index.to(contribution.device)]
            contribution = contribution * w.view(-1, *([1] * (contribution.dim() - 1)))
        if out is None:
            out = torch.zeros(n_images, *contribution.shape[1:], device=contribution.device, dtype=contribution.dtype)
        out.index_add_(0, image_index.to(out.device), contribution)
        start = stop
    assert out is not None
    return out
