"""Small statistics shared by metrics: mean with standard error, normalised trapezoid AUC."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n)); stderr is None for n < 2."""
    xs = [float(v) for v in values]
    if not xs:
        return math.nan, None
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    var = math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var / len(xs))


def trapezoid_auc(curves: torch.Tensor) -> torch.Tensor:
    """AUC of curves (..., S+1) sampled at fractions 0, 1/S, ..., 1: a constant c gives c."""
    steps = curves.shape[-1] - 1
    if steps < 1:
        return curves[..., 0]
    return (curves[..., 1:] + curves[..., :-1]).sum(-1) / (2 * steps)
