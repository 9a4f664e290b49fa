"""Insertion and deletion (Petsiuk et al., RISE, BMVC 2018; iGOS++ protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

import harness
from harness.components import Metric, Options, Summary
from harness.regions import Granularity
from harness.scoring import target_scores
from harness.stats import mean_stderr, trapezoid_auc
from harness.sweep import perturbation_curves


class SweepOptions(Options):
    steps: int | None = Field(None, ge=1)
    """Points after 0 on the curve; unset = 50 for pixel granularity, every region for patch/grid."""
    target: Literal["predicted", "label"] = "predicted"
    """The class scored: the clean top-1 prediction, or the ground-truth label (prediction if unlabelled)."""
    score: Literal["softmax", "logit"] = "softmax"


def choose_targets(clean_logits: torch.Tensor, labels: list[int | None], how: str) -> torch.Tensor:
    """Per-image target class: the clean top-1, or the label where there is one."""
    predicted = clean_logits.argmax(1)
    if how == "label":
        return torch.tensor([p if l is None else l for p, l in zip(predicted.tolist(), labels)], device=predicted.device)
    return predicted


def curve_tensor(records: list[dict[str, Any]]) -> torch.Tensor:
    """(N, S+1) curves of ``records``; a null point (a non-finite score in the samples file) is NaN."""
    nan = float("nan")
    return torch.tensor([[nan if v is None else v for v in r["values"]["curve"]] for r in records], dtype=torch.float64)


class CurveMetric(Metric):
    """Shared engine: rank regions by the attribution, move them in order, score every step."""

    needs_attributor: ClassVar[bool] = True
    needs_masker: ClassVar[bool] = True
    default_attributor: ClassVar[str] = "saliency"
    default_granularity: ClassVar[str] = "pixel"
    default_pixel_steps: ClassVar[int] = 50
    mode: ClassVar[Literal["insert", "remove"]]
    order: ClassVar[Literal["most", "least"]] = "most"
    batch_keys: ClassVar[tuple[str, ...]] = ()  # every value is per sample (`harness verify` compares them all)
    Options = SweepOptions

    def granularity(self, ctx, height: int, width: int) -> Granularity:
        text = getattr(ctx.masker.options, "granularity", None) or self.default_granularity
        return Granularity.parse(text, height, width)

    def steps(self, granularity: Granularity) -> int:
        if self.options.steps is not None:
            return min(self.options.steps, granularity.n_regions)
        return self.default_pixel_steps if granularity.kind == "pixel" else granularity.n_regions

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        model = ctx.model
        inputs = batch.inputs(model)
        clean_logits = model.logits(inputs)
        target = choose_targets(clean_logits, batch.labels, self.options.target)
        clean = target_scores(clean_logits, target, self.options.score)
        attribution = ctx.attributor.attribute(model, inputs, target, batch.seeds)
        baseline = ctx.masker.baseline(model, inputs, batch.seeds)
        granularity = self.granularity(ctx, inputs.shape[-2], inputs.shape[-1])
        curves = perturbation_curves(
            model,
            inputs,
            baseline,
            attribution,
            granularity,
            steps=self.steps(granularity),
            mode=self.mode,
            order=self.order,
            target=target,
            score=self.options.score,
            clean_scores=clean,
            fill=ctx.masker.composite_fill(model, batch.seeds) if hasattr(ctx.masker, "composite_fill") else None,
        )
        aucs = trapezoid_auc(curves)
        for i, sample in enumerate(batch.samples):
            ctx.keep_visual(sample.id, image=model.denormalise(inputs[i : i + 1])[0].clamp(0, 1), attribution=attribution[i])
        return [
            {
                "prediction": int(p),
                "values": {"auc": float(a), "target": int(t), "clean_score": float(c), "curve": curve},
            }
            for p, a, t, c, curve in zip(clean_logits.argmax(1).tolist(), aucs.tolist(), target.tolist(), clean.tolist(), curves.tolist())
        ]

    def summarize(self, records, ctx) -> Summary:
        aucs = [r["values"]["auc"] for r in records]
        value, stderr = mean_stderr(aucs)
        curves = curve_tensor(records)
        _, height, width = ctx.model.input_size
        granularity = self.granularity(ctx, height, width)
        return Summary(
            value=value,
            stderr=stderr,
            values={
                "mean_curve": curves.nanmean(0).tolist(),
                "granularity": granularity.label,
                "steps": curves.shape[1] - 1,
            },
        )


    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        from harness.plotting import plot_curves, plot_overlays
        from harness.visuals import load_visuals

        written = {}
        folder = Path(out_dir) / result.run_id
        label = self.id if result.attributor is None else f"{self.id} ({result.attributor.id})"
        curves = curve_tensor(records)
        lines = {"mean": curves.nanmean(0).tolist()}
        lines.update({r["sample_id"]: curves[i].tolist() for i, r in enumerate(records[:4])})
        action = "inserted" if self.mode == "insert" else "removed"
        plot_curves(folder / "curve.png", lines, title=f"{label}: mean AUC {result.value:.3f}",
                    xlabel=f"fraction of regions {action}", ylabel=f"{self.options.score} of target")
        written["curve"] = f"{result.run_id}/curve.png"
        visuals = load_visuals(Path(out_dir), result.run_id)
        panels = [(sid, v["image"], v["attribution"]) for sid, v in visuals.items() if "attribution" in v]
        if panels:
            plot_overlays(folder / "attributions.png", panels[:4], title=label)
            written["attributions"] = f"{result.run_id}/attributions.png"
        return written


class Insertion(CurveMetric):
    """Insertion AUC: insert the most important regions into the baseline first (higher is better)."""

    id: ClassVar[str] = "insertion"
    higher_is_better: ClassVar[bool] = True
    default_masker: ClassVar[str] = "blur"
    mode = "insert"
    citation: ClassVar[str] = "Petsiuk, Das, Saenko. RISE: Randomized Input Sampling for Explanation of Black-box Models. BMVC 2018"


class Deletion(CurveMetric):
    """Deletion AUC: remove the most important regions into the baseline first (lower is better)."""

    id: ClassVar[str] = "deletion"
    higher_is_better: ClassVar[bool] = False
    default_masker: ClassVar[str] = "blur"
    mode = "remove"
    citation: ClassVar[str] = Insertion.citation


@harness.hookimpl
def register_metrics(register):
    register(Insertion)
    register(Deletion)
