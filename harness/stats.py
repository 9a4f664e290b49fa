"""Small statistics shared by metrics: mean with standard error, normalised trapezoid AUC."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n)); stderr is None for n < 2.

    Values that are None (a NaN or infinity read back from a samples file), NaN or infinite are left
    out; with none left the mean is NaN.
    """
    xs = [x for x in (float(v) for v in values if v is not None) if math.isfinite(x)]
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
