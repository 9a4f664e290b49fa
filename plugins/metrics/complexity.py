"""Complexity of explanations, per image: sparseness (Gini index), complexity (entropy) and effective complexity.

For a map ``a`` with ``d`` pixels (the attributor's (H, W) map, flattened):

- ``sparseness`` (Chalasani et al., ICML 2020): the Gini index of ``|a|`` sorted ascending,
  ``G = sum_i (2i - d - 1) a_(i) / (d sum_i a_(i))``, i = 1..d; 0 for a uniform map, ``1 - 1/d`` for a
  one-hot map. Higher is better (a sparser, more concise explanation). ``epsilon`` is added to every
  ``|a_i|`` first (Quantus adds 1e-7; 0 here, so an all-zero map is undefined rather than 0).
- ``complexity`` (Bhatt, Weller, Moura, IJCAI 2020): the entropy of the normalised absolute map,
  ``p_i = |a_i| / sum_j |a_j|``, ``-sum_i p_i ln(p_i + 1e-12)`` (nats; Quantus's form); ``ln d`` for a
  uniform map, 0 for a one-hot map. Lower is better.
- ``effective_complexity`` (Nguyen & Martinez 2020): the number of pixels with ``|a_i| / max_j |a_j| > eps``
  (eps = 1e-5); the fraction of the map is recorded as well. Lower is better.

Every score is computed per image: Quantus normalises by one maximum over the whole batch, which leaves
the Gini index and the entropy unchanged (both are scale-invariant) but makes effective complexity
depend on the other images of the batch; here each map is divided by its own maximum.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

import harness
from harness.components import Metric, Options, Summary
from harness.stats import mean_stderr

from .explained import explain

CHALASANI = (
    "Chalasani, Chen, Chowdhury, Wu, Jha. Concise Explanations of Neural Networks using Adversarial "
    "Training. ICML 2020"
)
BHATT = "Bhatt, Weller, Moura. Evaluating and Aggregating Feature-based Model Explanations. IJCAI 2020"
NGUYEN = "Nguyen, Martinez. On Quantitative Aspects of Model Interpretability. arXiv:2007.07584, 2020"


def gini(maps: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Gini index of ``|a| + epsilon`` per map (B, ...) -> (B,) float64; NaN for an all-zero map."""
    a = maps.detach().reshape(len(maps), -1).to(torch.float64).abs() + epsilon
    d = a.shape[1]
    ordered = a.sort(dim=1).values
    i = torch.arange(1, d + 1, dtype=torch.float64, device=a.device)
    total = ordered.sum(1)
    out = ((2 * i - d - 1) * ordered).sum(1) / (d * total)
    return torch.where(total > 0, out, torch.full_like(out, math.nan))


def entropy(maps: torch.Tensor, log_epsilon: float = 1e-12) -> torch.Tensor:
    """``-sum p ln(p + log_epsilon)`` with ``p = |a| / sum |a|`` per map -> (B,) float64; NaN for an all-zero map."""
    a = maps.detach().reshape(len(maps), -1).to(torch.float64).abs()
    total = a.sum(1, keepdim=True)
    p = a / total
    out = -(p * torch.log(p + log_epsilon)).sum(1)
    return torch.where(total[:, 0] > 0, out, torch.full_like(out, math.nan))


def effective_count(maps: torch.Tensor, eps: float = 1e-5, normalise: bool = True) -> torch.Tensor:
    """Pixels with ``|a| / max |a| > eps`` (each map its own max; raw ``|a|`` without ``normalise``) -> (B,) int64."""
    a = maps.detach().reshape(len(maps), -1).to(torch.float64).abs()
    if normalise:
        peak = a.amax(1, keepdim=True)
        a = torch.where(peak > 0, a / peak.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))
    return (a > eps).sum(1)


class ComplexityOptions(Options):
    target: Literal["predicted", "label"] = "predicted"
    """The class explained: the clean top-1 prediction, or the ground-truth label (prediction if unlabelled)."""


class SparsenessOptions(ComplexityOptions):
    epsilon: float = Field(0.0, ge=0)
    """Added to every |a_i| before the Gini index (Quantus: 1e-7)."""


class EffectiveComplexityOptions(ComplexityOptions):
    eps: float = Field(1e-5, ge=0)
    """Threshold on |a_i| / max |a| (Quantus's default 1e-5)."""
    normalise: bool = True
    """Divide each map by its own max |a| first (False: threshold the raw |a|)."""


class MapMetric(Metric):
    """Shared engine: one map per image from the run's attributor, scored per image."""

    needs_attributor: ClassVar[bool] = True
    default_attributor: ClassVar[str] = "saliency"
    key: ClassVar[str]

    def scores(self, maps: torch.Tensor) -> dict[str, list[Any]]:
        """Per-image values (the headline under ``key``)."""
        raise NotImplementedError

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        done = explain(batch, ctx, self.options.target)
        values = self.scores(done.maps)
        return [
            {"prediction": int(p), "values": {"target": int(t), **{k: v[i] for k, v in values.items()}}}
            for i, (p, t) in enumerate(zip(done.logits.argmax(1).tolist(), done.target.tolist()))
        ]

    def summarize(self, records, ctx) -> Summary:
        value, stderr = mean_stderr([r["values"][self.key] for r in records])
        return Summary(value=value, stderr=stderr, values={"pixels": records[0]["values"].get("pixels")})


class Sparseness(MapMetric):
    """Sparseness: Gini index of the absolute map (Chalasani et al. 2020); higher is better."""

    id: ClassVar[str] = "sparseness"
    higher_is_better: ClassVar[bool] = True
    citation: ClassVar[str] = CHALASANI
    Options = SparsenessOptions
    key = "gini"

    def scores(self, maps: torch.Tensor) -> dict[str, list[Any]]:
        d = maps[0].numel()
        return {"gini": gini(maps, self.options.epsilon).tolist(), "pixels": [d] * len(maps)}


class Complexity(MapMetric):
    """Complexity: entropy of the normalised absolute map (Bhatt et al. 2020); lower is better."""

    id: ClassVar[str] = "complexity"
    higher_is_better: ClassVar[bool] = False
    citation: ClassVar[str] = BHATT
    Options = ComplexityOptions
    key = "entropy"

    def scores(self, maps: torch.Tensor) -> dict[str, list[Any]]:
        d = maps[0].numel()
        return {"entropy": entropy(maps).tolist(), "pixels": [d] * len(maps)}


class EffectiveComplexity(MapMetric):
    """Effective complexity: pixels whose |attribution| / max exceeds eps (Nguyen & Martinez 2020); lower is better."""

    id: ClassVar[str] = "effective_complexity"
    higher_is_better: ClassVar[bool] = False
    citation: ClassVar[str] = NGUYEN
    Options = EffectiveComplexityOptions
    key = "count"

    def scores(self, maps: torch.Tensor) -> dict[str, list[Any]]:
        d = maps[0].numel()
        counts = effective_count(maps, self.options.eps, self.options.normalise).tolist()
        return {"count": counts, "fraction": [c / d for c in counts], "pixels": [d] * len(maps)}

    def summarize(self, records, ctx) -> Summary:
        summary = super().summarize(records, ctx)
        summary.values["mean_fraction"] = mean_stderr([r["values"]["fraction"] for r in records])[0]
        return summary


@harness.hookimpl
def register_metrics(register):
    register(Sparseness)
    register(Complexity)
    register(EffectiveComplexity)
