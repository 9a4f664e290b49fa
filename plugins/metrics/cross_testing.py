"""Cross-testing (CVPR 2024): one model's explanation regions shown to another model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

import harness
from harness.components import Metric, Options, Summary
from harness.scoring import target_scores
from harness.stats import mean_stderr
from harness_plugins.metrics.insertion_deletion import choose_targets
from harness_plugins.metrics.sag import ConfidenceOracle, SearchSettings, beam_search
from harness_plugins.metrics.subexplanations import MSE_PRECISION_NOTE, grid_importance, grid_of, ranking_of


class CrossTestingOptions(Options):
    source: Literal["mse", "attribution"] = "mse"
    """The producer's regions: the union of its MSEs (SAG search), or its top cells by the attribution."""
    top_fraction: float = Field(0.2, gt=0, le=1)
    """With source=attribution: the fraction of grid cells kept (0.2 of 49 -> 10 cells)."""
    threshold: float = Field(0.9, gt=0, le=1)
    candidates: int = Field(15, ge=1)
    beam_width: int = Field(3, ge=1)
    max_roots: int = Field(10, ge=1)
    target: Literal["predicted", "label"] = "predicted"
    score: Literal["softmax", "logit"] = "softmax"


def classical_mds(distances: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """(N, dims) coordinates whose Euclidean distances approximate ``distances`` (Torgerson's MDS)."""
    n = distances.shape[0]
    d2 = distances.double() ** 2
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram = -0.5 * centre @ d2 @ centre
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)[:dims]
    return vectors[:, order] * values[order].clamp_min(0).sqrt()


class CrossTesting(Metric):
    """Cross-testing: row model's explanation regions, column model's relative confidence (N x N).

    For every image and ordered pair (A, B): keep only A's regions (the union of A's MSEs, or A's top
    cells), fill the rest with the baseline, and score B's own full-image top-1 class: p_B(masked) /
    p_B(full), and whether B's top-1 is unchanged. The value is the mean off-diagonal relative confidence.
    """

    reduced_precision_warning: ClassVar[str | None] = MSE_PRECISION_NOTE
    id: ClassVar[str] = "cross_testing"
    higher_is_better: ClassVar[bool | None] = None
    needs_attributor: ClassVar[bool] = True
    needs_masker: ClassVar[bool] = True
    default_attributor: ClassVar[str] = "igos"
    default_masker: ClassVar[str] = "black"
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = None
    citation: ClassVar[str] = (
        "Jiang, Khorram, Li Fuxin. Comparing the Decision-Making Mechanisms by Transformers and CNNs via "
        "Explanation Methods. CVPR 2024"
    )
    Options = CrossTestingOptions

    def regions(self, ctx, model, batch) -> list[list[int]]:
        """Per image: the grid cells the producer ``model`` keeps."""
        o = self.options
        inputs = batch.inputs(model)
        logits = model.logits(inputs)
        target = choose_targets(logits, batch.labels, o.target)
        granularity = grid_of(ctx, inputs.shape[-2], inputs.shape[-1])
        importance = grid_importance(ctx, model, inputs, target, batch.seeds, granularity)
        rankings = ranking_of(importance)
        if o.source == "attribution":
            keep = max(1, round(o.top_fraction * granularity.n_regions))
            return [sorted(r[:keep]) for r in rankings]
        p0 = target_scores(logits, target, o.score).tolist()
        baseline = ctx.masker.baseline(model, inputs, batch.seeds)
        oracle = ConfidenceOracle(model, inputs, baseline, granularity, target, o.score)
        settings = SearchSettings(o.threshold, o.candidates, o.beam_width, o.max_roots, granularity.n_regions)
        found = oracle.drive({i: beam_search(rankings[i], p0[i], settings) for i in range(len(inputs))})
        return [sorted({p for root in found[i].roots for p in root}) for i in range(len(inputs))]

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        o = self.options
        models = ctx.models
        kept = [self.regions(ctx, m, batch) for m in models]
        relative = torch.zeros(len(batch), len(models), len(models))
        agree = torch.zeros(len(batch), len(models), len(models))
        own_top1 = []
        for b, evaluator in enumerate(models):
            inputs = batch.inputs(evaluator)
            logits = evaluator.logits(inputs)
            top1 = logits.argmax(1)
            own_top1.append(top1.tolist())
            full = target_scores(logits, top1, o.score)
            granularity = grid_of(ctx, inputs.shape[-2], inputs.shape[-1])
            baseline = ctx.masker.baseline(evaluator, inputs, batch.seeds)
            keep = torch.zeros(len(models) * len(batch), granularity.n_regions, device=inputs.device)
            for a in range(len(models)):
                for i in range(len(batch)):
                    if kept[a][i]:
                        keep[a * len(batch) + i, kept[a][i]] = 1.0
            mask = granularity.render(keep).to(inputs.dtype)
            images = torch.arange(len(batch), device=inputs.device).repeat(len(models))
            composite = mask * inputs[images] + (1 - mask) * baseline[images]
            masked_logits = evaluator.logits(composite)
            scores = target_scores(masked_logits, top1[images], o.score).view(len(models), len(batch))
            same = (masked_logits.argmax(1) == top1[images]).float().view(len(models), len(batch))
            relative[:, :, b] = (scores / full.view(1, -1)).T.cpu()
            agree[:, :, b] = same.T.cpu()
        return [
            {
                "prediction": own_top1[0][i],
                "values": {
                    "relative": relative[i].tolist(),
                    "top1_agreement": agree[i].tolist(),
                    "regions": [kept[a][i] for a in range(len(models))],
                    "top1": [own_top1[b][i] for b in range(len(models))],
                },
            }
            for i in range(len(batch))
        ]

    def summarize(self, records, ctx) -> Summary:
        names = [m.id for m in ctx.models]
        relative = torch.tensor([r["values"]["relative"] for r in records], dtype=torch.float64)
        agree = torch.tensor([r["values"]["top1_agreement"] for r in records], dtype=torch.float64)
        mean_rel, mean_agree = relative.mean(0), agree.mean(0)
        n = len(names)
        off = ~torch.eye(n, dtype=torch.bool)
        per_image = [float(r[off].mean()) for r in relative]
        value, stderr = mean_stderr(per_image)
        symmetric = (mean_rel + mean_rel.T) / 2
        distance = (1 - symmetric.clamp(max=1)).clamp_min(0)
        distance.fill_diagonal_(0)
        coords = classical_mds(distance)
        return Summary(
            value=value,
            stderr=stderr,
            values={
                "models": names,
                "relative": mean_rel.tolist(),
                "top1_agreement": mean_agree.tolist(),
                "landscape": coords.tolist(),
                "producer_mean": mean_rel[off.nonzero()[:, 0], off.nonzero()[:, 1]].view(n, n - 1).mean(1).tolist(),
                "evaluator_mean": mean_rel.T[off].view(n, n - 1).mean(1).tolist(),
            },
        )

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        from harness.plotting import pyplot

        plt = pyplot()
        names = result.values["models"]
        folder = Path(out_dir) / result.run_id
        folder.mkdir(parents=True, exist_ok=True)
        matrix = torch.tensor(result.values["relative"])
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1.0 + 0.6 * len(names)), dpi=120)
        image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0, vmax=max(1.0, float(matrix.max())))
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set(xlabel="evaluator", ylabel="map producer", title="cross-testing: relative confidence")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(folder / "cross_testing.png")
        plt.close(fig)
        coords = torch.tensor(result.values["landscape"])
        fig, ax = plt.subplots(figsize=(4.5, 4), dpi=120)
        ax.scatter(coords[:, 0].numpy(), coords[:, 1].numpy())
        for name, (x, y) in zip(names, coords.tolist()):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title="model landscape (classical MDS of 1 - symmetrised matrix)")
        ax.title.set_fontsize(8)
        fig.tight_layout()
        fig.savefig(folder / "landscape.png")
        plt.close(fig)
        return {"heatmap": f"{result.run_id}/cross_testing.png", "landscape": f"{result.run_id}/landscape.png"}


@harness.hookimpl
def register_metrics(register):
    register(CrossTesting)
