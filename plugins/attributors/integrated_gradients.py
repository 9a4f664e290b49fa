"""Integrated Gradients (Sundararajan et al. 2017), all path points in the batch dimension."""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
from pydantic import Field

from harness.components import Attributor, Options
from harness.model import LoadedModel
from harness.scoring import accumulate_gradients


class IGOptions(Options):
    steps: int = Field(25, ge=1)
    """m: gradient evaluations along the straight path from the baseline to the image."""
    baseline: Literal["black", "mean", "blur"] = "black"
    """x0: black = zeros in pixel space (seed 004), mean = zeros after normalisation, blur = k51/s50 blur."""
    method: Literal["riemann_right", "trapezoid", "gausslegendre"] = "riemann_right"
    """Riemann right sum (k = 1..m), the trapezoid rule over k = 0..m (m + 1 points), or m-point
    Gauss-Legendre (Captum's default quadrature: the same points and weights as Captum)."""
    score: Literal["logit", "softmax"] = "logit"
    reduce: Literal["sum", "abs_sum"] = "sum"
    """How the (3, H, W) attribution becomes a map: signed channel sum, or sum of magnitudes."""


def ig_baseline(model: LoadedModel, inputs: torch.Tensor, kind: str) -> torch.Tensor:
    """The IG reference input in normalised space."""
    if kind == "black":
        return model.normalise(torch.zeros_like(inputs))
    if kind == "mean":
        return torch.zeros_like(inputs)
    from harness_plugins.maskers.fills import gaussian_blur

    return gaussian_blur(inputs, 51, 50.0)


def path_points(steps: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) of the quadrature along the path; weights sum to 1."""
    if method == "riemann_right":
        return torch.arange(1, steps + 1, dtype=torch.float32) / steps, torch.full((steps,), 1.0 / steps)
    if method == "gausslegendre":
        return gauss_legendre(steps)
    alphas = torch.arange(0, steps + 1, dtype=torch.float32) / steps
    weights = torch.full((steps + 1,), 1.0 / steps)
    weights[0] = weights[-1] = 0.5 / steps
    return alphas, weights


def gauss_legendre(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on [0, 1], as Captum's ``approximation_methods`` computes them:
    numpy's ``leggauss`` on [-1, 1] (float64), nodes mapped by (1 + x) / 2, weights halved.

    Exact for a path integrand that is a polynomial of degree up to 2 * steps - 1."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor((0.5 * (1 + nodes)).tolist(), dtype=torch.float32)
    return alphas, torch.tensor((0.5 * weights).tolist(), dtype=torch.float32)


def integrated_gradients(model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, options: IGOptions) -> torch.Tensor:
    """(B, 3, H, W) attributions (x - x0) * average gradient along the path."""
    base = ig_baseline(model, inputs, options.baseline)
    alphas, weights = path_points(options.steps, options.method)
    alphas = alphas.to(inputs.device)
    delta = inputs - base
    buffer: list[torch.Tensor] = []

    def make_rows(image: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Rows are image-major, so a chunk is a few runs of one image's path points: each run is
        # written into a reusable buffer as a * delta + base, broadcasting that image's tensors
        # (the same values as base[image] + a * delta[image], without per-row gathers).
        if not buffer or len(buffer[0]) < len(image):
            buffer[:] = [torch.empty((len(image), *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)]
        out = buffer[0][: len(image)]
        a = alphas[sample.to(inputs.device)].view(-1, 1, 1, 1)
        row = 0
        for i, run in zip(*(t.tolist() for t in torch.unique_consecutive(image, return_counts=True))):
            segment = out[row : row + run]
            torch.mul(a[row : row + run], delta[i], out=segment)
            segment.add_(base[i])
            row += run
        return out, target[image.to(target.device)]

    avg_grad = accumulate_gradients(
        model, len(inputs), len(alphas), make_rows, lambda grad, x: grad, options.score, weights
    )
    return delta * avg_grad


class IntegratedGradients(Attributor):
    """Integrated Gradients: (x - x0) x mean gradient on the path x0 -> x (m = 25, black baseline)."""

    id: ClassVar[str] = "integrated_gradients"
    Options = IGOptions

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        attributions = integrated_gradients(model, inputs, target, self.options)
        return attributions.sum(1) if self.options.reduce == "sum" else attributions.abs().sum(1)
