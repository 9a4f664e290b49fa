"""Target scores and their input gradients, evaluated in fixed-size chunks."""

from __future__ import annotations

from typing import Literal

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

    def chunk(start: int, stop: int) -> torch.Tensor:
        x = inputs[start:stop].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            scores = target_scores(model.module(x), target[start:stop], kind)
            (grad,) = torch.autograd.grad(scores.sum(), x)
        return grad

    return map_in_chunks(len(inputs), model.batch_size, chunk)
