"""Completeness (Sundararajan, Taly, Yan, ICML 2017): do the attributions sum to F(x) - F(x')?

Per image: ``S = sum_i a_i`` over the attributor's map (its signed channel sum: integrated gradients
with ``reduce=sum``), ``D = F(x) - F(x')`` with ``F`` the target's score (logit unless the attributor
differentiates the softmax) and ``x'`` the attributor's own baseline, and the relative gap
``|S - D| / |D|`` (undefined when ``D = 0``). Lower is better; the IG paper asks for a gap within 5%
and reaches it with 20 to 300 steps, so the quadrature of IG (``steps``, ``method``) shows here.

The baseline ``auto`` is the attributor's ``baseline`` option where it has one (integrated_gradients:
``black`` by default, zeros in pixel space), zeros in the model's input space for gradient x input
(``mean``); any other attributor needs ``-o metric.baseline=...``. Quantus's ``Completeness`` returns
a boolean (exact equality) on batch-normalised maps; here the maps are not normalised and the gap is reported.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, Literal

import torch

import harness
from harness.components import Metric, Options, Summary
from harness.errors import HarnessError
from harness.scoring import ScoreKind, target_scores
from harness.stats import mean_stderr

from .explained import explain

CITATION = "Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks. ICML 2017"
BASELINES = ("black", "mean", "blur", "noise")
ZERO_INPUT_ATTRIBUTORS = ("input_x_gradient", "captum.InputXGradient")


class CompletenessOptions(Options):
    target: Literal["predicted", "label"] = "predicted"
    """The class explained: the clean top-1 prediction, or the ground-truth label (prediction if unlabelled)."""
    baseline: Literal["auto", "black", "mean", "blur", "noise"] = "auto"
    """x': the attributor's own baseline (auto), or a harness fill (black = zeros in pixel space, mean = zeros in input space)."""
    score: Literal["auto", "logit", "softmax"] = "auto"
    """F: the attributor's ``score`` option (auto; logit when it has none), or the logit / softmax probability."""


def full_precision() -> contextlib.AbstractContextManager[None]:
    """fp32 forward passes for models loaded with reduced precision (``--precision``), as attributors run."""
    try:
        from harness.execution import full_precision as context
    except ImportError:
        return contextlib.nullcontext()
    return context()


def resolve_baseline(attributor: Any, wanted: str) -> str:
    """The baseline fill completeness compares against for ``attributor``."""
    if wanted != "auto":
        return wanted
    own = getattr(getattr(attributor, "options", None), "baseline", None)
    if isinstance(own, str) and own in BASELINES:
        return own
    if getattr(attributor, "id", None) in ZERO_INPUT_ATTRIBUTORS:
        return "mean"
    raise HarnessError(
        f"completeness: attributor {getattr(attributor, 'id', attributor)!r} has no baseline of its own; "
        "choose one with -o metric.baseline=black|mean|blur|noise"
    )


def resolve_score(attributor: Any, wanted: Literal["auto", "logit", "softmax"]) -> ScoreKind:
    """The score F whose difference the attributions should add up to."""
    if wanted != "auto":
        return wanted
    own = getattr(getattr(attributor, "options", None), "score", None)
    return own if own in ("logit", "softmax") else "logit"


def baseline_inputs(model: Any, inputs: torch.Tensor, seeds: list[int], kind: str) -> torch.Tensor:
    """x' in the model's input space (the same tensors integrated_gradients integrates from)."""
    if kind == "noise":
        from harness_plugins.maskers.fills import NoiseFill

        return NoiseFill().baseline(model, inputs, seeds).to(inputs.dtype)
    from harness_plugins.attributors.integrated_gradients import ig_baseline

    return ig_baseline(model, inputs, kind)


class Completeness(Metric):
    """Completeness: relative gap |sum of attributions - (F(x) - F(baseline))| / |F(x) - F(baseline)| (lower is better).

    Per sample: ``gap``, ``attribution_sum``, ``delta`` (F(x) - F(x')), ``score`` (F(x)), ``baseline_score``
    (F(x')), ``target``. Result values: ``median_gap``, ``within_5pct`` (fraction of samples with gap <= 0.05),
    ``baseline`` and ``score`` used.
    """

    id: ClassVar[str] = "completeness"
    higher_is_better: ClassVar[bool] = False
    needs_attributor: ClassVar[bool] = True
    default_attributor: ClassVar[str] = "integrated_gradients"
    citation: ClassVar[str] = CITATION
    Options = CompletenessOptions

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        attributor = ctx.attributor
        if getattr(getattr(attributor, "options", None), "reduce", "sum") != "sum":
            raise HarnessError("completeness needs the signed channel sum of the attributions: -o attributor.reduce=sum")
        kind = resolve_baseline(attributor, self.options.baseline)
        score = resolve_score(attributor, self.options.score)
        model = ctx.model
        done = explain(batch, ctx, self.options.target, attributor)
        inputs, logits, target, maps = done.inputs, done.logits, done.target, done.maps
        base = baseline_inputs(model, inputs, list(batch.seeds), kind)
        with full_precision():  # F in the precision the attributions were computed in (fp32)
            f_x = target_scores(model.logits(inputs), target, score).double()
            f_base = target_scores(model.logits(base), target, score).double()
        total = maps.detach().reshape(len(maps), -1).double().sum(1)
        delta = f_x - f_base
        gap = (total - delta).abs() / delta.abs()
        return [
            {
                "prediction": int(p),
                "values": {
                    "gap": float(g) if math.isfinite(float(g)) else math.nan,
                    "attribution_sum": float(s),
                    "delta": float(d),
                    "score": float(fx),
                    "baseline_score": float(fb),
                    "target": int(t),
                },
            }
            for p, g, s, d, fx, fb, t in zip(logits.argmax(1).tolist(), gap.tolist(), total.tolist(), delta.tolist(),
                                             f_x.tolist(), f_base.tolist(), target.tolist())
        ]

    def summarize(self, records, ctx) -> Summary:
        gaps = [r["values"]["gap"] for r in records]
        value, stderr = mean_stderr(gaps)
        finite = sorted(g for g in gaps if g is not None and math.isfinite(g))
        median = float(torch.tensor(finite, dtype=torch.float64).quantile(0.5)) if finite else math.nan
        within = sum(g <= 0.05 for g in finite) / len(finite) if finite else math.nan
        attributor = ctx.attributor
        values: dict[str, Any] = {"median_gap": median, "within_5pct": within}
        if attributor is not None:
            values["baseline"] = resolve_baseline(attributor, self.options.baseline)
            values["score"] = resolve_score(attributor, self.options.score)
        return Summary(value=value, stderr=stderr, values=values)


@harness.hookimpl
def register_metrics(register):
    register(Completeness)
