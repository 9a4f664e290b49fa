"""Robustness of explanations to small input perturbations: max- and average sensitivity (Yeh et al.,
NeurIPS 2019) and the local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018).

For an image x and its map e(x) (the attributor's (H, W) map for the target class, which stays the
same for every perturbed copy), n perturbed copies x' = x + delta are drawn per image:

- ``max_sensitivity``: ``max_k ||e(x'_k) - e(x)||_2 / ||e(x)||_2`` with delta uniform in the L-inf ball
  of radius r (each element in [-r, r]); r = 0.2 and n = 50 as Yeh et al.'s reference code
  (``infid_sen_utils.get_exp_sens``; Quantus: the same r, n = 200). The division by ``||e(x)||`` is
  the reference code's and Quantus's; the paper's definition is the absolute difference
  (``relative=false``). ``avg_sensitivity``: the mean over the same draws instead of the maximum.
- ``local_lipschitz``: ``max_k ||e(x) - e(x'_k)||_2 / ||x - x'_k||_2`` with delta ~ N(0, sigma^2) per
  element, sigma = 0.1 and n = 200 (Quantus's ``LocalLipschitzEstimate``; the paper optimises over
  an epsilon-ball, with a budget it does not state); ``noise=uniform`` draws from the L-inf ball instead.

The radius and sigma are in the model's (normalised) input space, as in the reference code and Quantus
(r = 0.2 is about 0.045 in [0, 1] pixel units for ImageNet's std); ``space=pixel`` measures them in
[0, 1] pixel units (delta scaled by 1/std per channel, and ||x - x'|| measured in pixel units too).
Copies are not clipped to the valid pixel range (as both references). Maps are compared raw; Quantus's
``LocalLipschitzEstimate`` normalises every map by one maximum over the whole batch, so its scores
depend on the batch; ``normalise=true`` here divides each map by its own max |e| (per image).

All copies of a batch go through the attributor together, in chunks of ``--batch-size`` rows that mix
images (the clean maps come from the attribution cache; the copies are not cached). A copy is explained
with its image's seed, so a stochastic attributor (SmoothGrad, RISE) draws the same noise as for the
clean map and the score measures the input's effect only. Perturbations are seeded per image and draw,
so scores do not depend on the batch or its size. Lower is better for all three.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Sequence

import torch
from pydantic import Field

import harness
from harness.components import Metric, Options, Summary
from harness.stats import mean_stderr

from .explained import explain

YEH = (
    "Yeh, Hsieh, Suggala, Inouye, Ravikumar. On the (In)fidelity and Sensitivity of Explanations. "
    "NeurIPS 2019"
)
ALVAREZ_MELIS = "Alvarez-Melis, Jaakkola. On the Robustness of Interpretability Methods. ICML Workshop on Human Interpretability 2018"


class PerturbationOptions(Options):
    target: Literal["predicted", "label"] = "predicted"
    """The class explained (for the image and all its copies): the clean top-1, or the label where there is one."""
    space: Literal["input", "pixel"] = "input"
    """Units of the perturbation: the model's normalised input (reference code, Quantus) or [0, 1] pixels."""


class SensitivityOptions(PerturbationOptions):
    radius: float = Field(0.2, gt=0)
    """Half-width r of the L-inf ball: every element moves by U[-r, r] (Yeh et al.'s code, Quantus: 0.2)."""
    samples: int = Field(50, ge=1)
    """Perturbed copies per image (Yeh et al.'s code: 50; Quantus: 200)."""
    relative: bool = True
    """Divide ||e(x') - e(x)|| by ||e(x)|| (reference code, Quantus); false: the paper's absolute form."""


class LipschitzOptions(PerturbationOptions):
    noise: Literal["gaussian", "uniform"] = "gaussian"
    """How copies are drawn: x + N(0, scale^2) per element (Quantus), or uniform in the L-inf ball of radius scale."""
    scale: float = Field(0.1, gt=0)
    """The Gaussian's std (Quantus: 0.1) or the ball's radius."""
    samples: int = Field(200, ge=1)
    """Perturbed copies per image (Quantus: 200)."""
    normalise: bool = False
    """Divide each map by its own max |e| first (Quantus normalises by one max over the whole batch)."""


def perturbation(seed: int, draw: int, shape: Sequence[int], kind: str, scale: float) -> torch.Tensor:
    """Copy ``draw`` of the image with per-sample ``seed``: uniform in [-scale, scale] or N(0, scale^2)."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(draw) * 7919 + 0x5E75) % (2**63))
    if kind == "uniform":
        return (torch.rand(tuple(shape), generator=gen) * 2 - 1) * scale
    return torch.randn(tuple(shape), generator=gen) * scale


def _uncached(attributor: Any) -> Any:
    """The attributor behind the attribution cache: perturbed copies are not worth storing."""
    return getattr(attributor, "inner", attributor)


def copy_distances(
    model: Any,
    attributor: Any,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    seeds: Sequence[int],
    *,
    samples: int,
    kind: str,
    scale: float,
    space: str,
    chunk_size: int,
    normalise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, samples) ``||e(x'_k) - e(x)||_2`` and ``||x'_k - x||_2`` for every image and draw.

    Rows (image, draw) are explained ``chunk_size`` at a time, image-major, mixing images.
    """
    n_images = len(inputs)
    shape = inputs.shape[1:]
    per_channel = (1 / model.std).to(inputs) if space == "pixel" else None  # pixel units -> input units
    clean = maps.detach().reshape(n_images, -1).double()
    if normalise:
        clean = _by_own_max(clean)
    map_distance = torch.empty(n_images, samples, dtype=torch.float64)
    input_distance = torch.empty(n_images, samples, dtype=torch.float64)
    total = n_images * samples
    for start in range(0, total, max(1, chunk_size)):
        rows = torch.arange(start, min(total, start + max(1, chunk_size)))
        image, draw = rows // samples, rows % samples
        delta = torch.stack([perturbation(seeds[int(i)], int(k), shape, kind, scale) for i, k in zip(image, draw)])
        delta = delta.to(inputs)
        step = delta * per_channel if per_channel is not None else delta
        perturbed = inputs[image.to(inputs.device)] + step
        copies = attributor.attribute(model, perturbed, target[image.to(target.device)], [seeds[int(i)] for i in image])
        copies = copies.detach().reshape(len(rows), -1).double()
        if normalise:
            copies = _by_own_max(copies)
        map_distance[image, draw] = (copies - clean[image.to(clean.device)]).norm(dim=1).cpu()
        moved = perturbed - inputs[image.to(inputs.device)]  # as realised in the input's precision
        if per_channel is not None:
            moved = moved / per_channel
        input_distance[image, draw] = moved.reshape(len(rows), -1).double().norm(dim=1).cpu()
    return map_distance, input_distance


def _by_own_max(maps: torch.Tensor) -> torch.Tensor:
    peak = maps.abs().amax(1, keepdim=True)
    return torch.where(peak > 0, maps / torch.where(peak > 0, peak, 1.0), maps)


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, with 0 / 0 = 0 (a map that is zero and stays zero is perfectly stable)."""
    safe = torch.where(denominator > 0, denominator, 1.0)
    return torch.where(denominator > 0, numerator / safe, torch.where(numerator > 0, math.inf, 0.0))


class RobustnessMetric(Metric):
    """Shared engine: clean maps, then every perturbed copy of the batch through the attributor."""

    needs_attributor: ClassVar[bool] = True
    default_attributor: ClassVar[str] = "saliency"
    higher_is_better: ClassVar[bool] = False
    key: ClassVar[str]

    def draws(self) -> tuple[str, float]:
        """(noise kind, scale) of the perturbations."""
        raise NotImplementedError

    def reduce(self, map_distance: torch.Tensor, input_distance: torch.Tensor, clean_norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image values from the (B, n) distances and the (B,) norms of the clean maps."""
        raise NotImplementedError

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        model = ctx.model
        done = explain(batch, ctx, self.options.target)
        inputs, logits, target, maps = done.inputs, done.logits, done.target, done.maps
        kind, scale = self.draws()
        map_distance, input_distance = copy_distances(
            model, _uncached(ctx.attributor), inputs, maps, target, batch.seeds,
            samples=self.options.samples, kind=kind, scale=scale, space=self.options.space,
            chunk_size=ctx.batch_size, normalise=getattr(self.options, "normalise", False),
        )
        clean = maps.detach().reshape(len(maps), -1).double()
        if getattr(self.options, "normalise", False):
            clean = _by_own_max(clean)
        norms = clean.norm(dim=1).cpu()
        values = {**self.reduce(map_distance, input_distance, norms), "map_norm": norms}
        return [
            {"prediction": int(p), "values": {"target": int(t), **{k: float(v[i]) for k, v in values.items()}}}
            for i, (p, t) in enumerate(zip(logits.argmax(1).tolist(), target.tolist()))
        ]

    def summarize(self, records, ctx) -> Summary:
        value, stderr = mean_stderr([r["values"][self.key] for r in records])
        others = {k: mean_stderr([r["values"][k] for r in records])[0]
                  for k in records[0]["values"] if k not in ("target", self.key)}
        return Summary(value=value, stderr=stderr, values={**others, "samples": self.options.samples})


class Sensitivity(RobustnessMetric):
    Options = SensitivityOptions
    citation: ClassVar[str] = YEH

    def draws(self) -> tuple[str, float]:
        return "uniform", self.options.radius

    def reduce(self, map_distance, input_distance, clean_norm):
        if self.options.relative:
            ratios = ratio(map_distance, clean_norm[:, None].expand_as(map_distance))
        else:
            ratios = map_distance
        return {"max_sensitivity": ratios.amax(1), "avg_sensitivity": ratios.mean(1)}


class MaxSensitivity(Sensitivity):
    """Max-sensitivity: the largest relative change of the map within an L-inf ball (Yeh et al. 2019); lower is better."""

    id: ClassVar[str] = "max_sensitivity"
    key = "max_sensitivity"


class AvgSensitivity(Sensitivity):
    """Average sensitivity: the mean relative change of the map within an L-inf ball (Yeh et al. 2019); lower is better."""

    id: ClassVar[str] = "avg_sensitivity"
    key = "avg_sensitivity"


class LocalLipschitz(RobustnessMetric):
    """Local Lipschitz estimate: max ||e(x) - e(x')|| / ||x - x'|| over noisy copies (Alvarez-Melis & Jaakkola 2018); lower is better."""

    id: ClassVar[str] = "local_lipschitz"
    Options = LipschitzOptions
    citation: ClassVar[str] = ALVAREZ_MELIS
    key = "lipschitz"

    def draws(self) -> tuple[str, float]:
        return self.options.noise, self.options.scale

    def reduce(self, map_distance, input_distance, clean_norm):
        ratios = ratio(map_distance, input_distance)
        return {"lipschitz": ratios.amax(1), "mean_ratio": ratios.mean(1)}


@harness.hookimpl
def register_metrics(register):
    register(MaxSensitivity)
    register(AvgSensitivity)
    register(LocalLipschitz)
