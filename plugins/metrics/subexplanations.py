"""Minimal sufficient explanations (SAG) and sub-explanation counting (CVPR 2024)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

import harness
from harness.components import Metric, Options, Summary
from harness.errors import HarnessError
from harness.regions import Granularity, ranks
from harness.scoring import target_scores
from harness.stats import mean_stderr
from harness_plugins.metrics.insertion_deletion import choose_targets
from harness_plugins.metrics.sag import ConfidenceOracle, SearchSettings, beam_search, count_subexplanations

DEFAULT_THRESHOLDS = (0.9, 0.8, 0.7, 0.6, 0.5)


class SubexplanationOptions(Options):
    threshold: float = Field(0.9, gt=0, le=1)
    """A patch set is sufficient when its confidence exceeds threshold x the full-image confidence."""
    candidates: int = Field(15, ge=1)
    """q: the most important unused patches tried per beam member."""
    beam_width: int = Field(3, ge=1)
    """Beam members kept per depth (protocol=sag: the published parameter, which keeps beam_width + 1)."""
    protocol: Literal["clean", "sag"] = "clean"
    """clean: distinct successors, every sufficient successor pruned, beam_width members, pruning stops
    at one patch. sag: the published search.py exactly (repeated successors kept, beam filled to
    beam_width + 1 and the sorted successors read only up to that point, pruning down to the empty set)."""
    max_roots: int = Field(10, ge=1)
    """Stop after the depth at which more than this many distinct MSEs exist."""
    max_depth: int | None = Field(None, ge=1)
    """Deepest search level; unset = the number of grid cells (49 for grid:7)."""
    pruning: Literal["batched", "sequential"] = "batched"
    """How the 1-minimal pruning is evaluated; both give the same MSEs."""
    count_thresholds: list[float] = list(DEFAULT_THRESHOLDS)
    """Relative confidences at which sub-explanations are counted."""
    headline_threshold: float = 0.5
    """The result's value is the mean count of sub-explanations at this relative confidence."""
    exhaustive_max: int = Field(12, ge=0)
    """MSEs with at most this many patches have all proper subsets evaluated; larger ones use the deletion
    tree (0: the tree for every MSE, SAG's patch-deletion tree; far fewer passes, but it counts only
    subsets reachable through one-patch deletions that keep the lowest threshold)."""
    max_subsets: int = Field(20000, ge=1)
    """Safety cap on evaluated subsets per image (a truncated count is flagged)."""
    count: bool = True
    """Count sub-explanations (False: only find the MSEs)."""
    target: Literal["predicted", "label"] = "predicted"
    score: Literal["softmax", "logit"] = "softmax"

    @field_validator("count_thresholds")
    @classmethod
    def _thresholds(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < t <= 1 for t in value):
            raise ValueError("count_thresholds must be a non-empty list of numbers in (0, 1]")
        return sorted(set(value), reverse=True)


def grid_of(ctx: Any, height: int, width: int, default: str = "grid:7") -> Granularity:
    """The masker's granularity, which must be a tent grid."""
    text = getattr(ctx.masker.options, "granularity", None) or default
    granularity = Granularity.parse(text, height, width)
    if granularity.kind != "grid":
        raise HarnessError(f"this metric needs a tent grid granularity (grid:G), got {granularity.label}")
    return granularity


def grid_importance(ctx: Any, model: Any, inputs: torch.Tensor, target: torch.Tensor, seeds: list[int], granularity: Granularity) -> torch.Tensor:
    """(B, G*G) importance of every grid cell: the attributor's own grid if it has one (I-GOS), else
    its map pooled onto the tents."""
    attributor = ctx.attributor
    coarse = getattr(attributor, "coarse", None)
    if coarse is not None and getattr(attributor.options, "grid", None) == granularity.size:
        return coarse(model, inputs, target, seeds).reshape(len(inputs), -1)
    return granularity.region_scores(attributor.attribute(model, inputs, target, seeds))


def ranking_of(scores: torch.Tensor) -> list[list[int]]:
    """Cells by decreasing importance, ties by cell index."""
    r = ranks(scores)
    return [torch.argsort(row, stable=True).tolist() for row in r]


MSE_PRECISION_NOTE = (
    "minimal sufficient explanations are a threshold test on confidences, and reduced precision changes "
    "which sets pass (measured on chelsea with Lite0: none of 14 bf16 MSEs equals one of the 11 fp32 ones)"
)


class Subexplanations(Metric):
    """Sub-explanation count: proper subsets of an image's MSEs that keep a relative confidence >= t.

    MSEs come from SAG's beam search over a 7 x 7 grid of soft tents with a black fill, candidates
    ranked by I-GOS. The value is the mean number of sub-explanations at ``headline_threshold``.
    """

    reduced_precision_warning: ClassVar[str | None] = MSE_PRECISION_NOTE
    id: ClassVar[str] = "subexplanations"
    higher_is_better: ClassVar[bool | None] = None
    needs_attributor: ClassVar[bool] = True
    needs_masker: ClassVar[bool] = True
    default_attributor: ClassVar[str] = "igos"
    default_masker: ClassVar[str] = "black"
    citation: ClassVar[str] = (
        "Jiang, Khorram, Li Fuxin. Comparing the Decision-Making Mechanisms by Transformers and CNNs via "
        "Explanation Methods. CVPR 2024; Shitole et al. One Explanation is Not Enough: Structured Attention "
        "Graphs for Image Classification. NeurIPS 2021"
    )
    Options = SubexplanationOptions

    def settings(self, n_cells: int) -> SearchSettings:
        o = self.options
        return SearchSettings(
            threshold=o.threshold,
            candidates=o.candidates,
            beam_width=o.beam_width,
            max_roots=o.max_roots,
            max_depth=min(o.max_depth or n_cells, n_cells),
            pruning=o.pruning,
            protocol=o.protocol,
        )

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        o = self.options
        model = ctx.model
        inputs = batch.inputs(model)
        clean_logits = model.logits(inputs)
        target = choose_targets(clean_logits, batch.labels, o.target)
        p0 = target_scores(clean_logits, target, o.score).tolist()
        granularity = grid_of(ctx, inputs.shape[-2], inputs.shape[-1])
        importance = grid_importance(ctx, model, inputs, target, batch.seeds, granularity)
        rankings = ranking_of(importance)
        baseline = ctx.masker.baseline(model, inputs, batch.seeds)
        oracle = ConfidenceOracle(model, inputs, baseline, granularity, target, o.score)
        settings = self.settings(granularity.n_regions)
        found = oracle.drive({i: beam_search(rankings[i], p0[i], settings) for i in range(len(inputs))})
        counted = {}
        if o.count:
            counted = oracle.drive({
                i: count_subexplanations(found[i].roots, p0[i], min(o.count_thresholds), o.exhaustive_max, o.max_subsets)
                for i in range(len(inputs))
            })
        records = []
        for i, sample in enumerate(batch.samples):
            result = found[i]
            mses = [
                {"patches": list(root), "confidence": oracle.cache[i][root], "relative": oracle.cache[i][root] / p0[i]}
                for root in result.roots
            ]
            values: dict[str, Any] = {
                "target": int(target[i]),
                "p0": p0[i],
                "ranking": rankings[i],
                "ranking_scores": importance[i].tolist(),
                "mses": mses,
                "n_mses": len(mses),
                "mse_sizes": [len(m["patches"]) for m in mses],
                "depth": result.depth,
                "forward_passes": dict(oracle.passes[i]),
            }
            if o.count:
                rel = counted[i].relative
                values["counts"] = {f"{t:g}": sum(v >= t for v in rel.values()) for t in o.count_thresholds}
                values["truncated"] = counted[i].truncated
                values["subsets"] = {
                    "distinct": len(rel),
                    "per_mse": counted[i].per_mse_subsets,
                    "evaluated": oracle.passes[i].get("counting", 0),
                }
                values["tree"] = [_tree(root, rel, p0[i], oracle.cache[i][root]) for root in result.roots[:3]]
            records.append({"prediction": int(clean_logits[i].argmax()), "values": values})
            ctx.keep_visual(
                sample.id,
                image=model.denormalise(inputs[i : i + 1])[0].clamp(0, 1),
                baseline=model.denormalise(baseline[i : i + 1])[0].clamp(0, 1),
            )
        return records

    def summarize(self, records, ctx) -> Summary:
        o = self.options
        values: dict[str, Any] = {
            "grid": grid_of(ctx, *ctx.model.input_size[1:]).label,
            "mean_n_mses": mean_stderr([r["values"]["n_mses"] for r in records])[0],
            "mean_mse_size": mean_stderr([s for r in records for s in r["values"]["mse_sizes"]])[0],
            "mse_size_histogram": _histogram([s for r in records for s in r["values"]["mse_sizes"]]),
        }
        phases = sorted({k for r in records for k in r["values"]["forward_passes"]})
        values["mean_forward_passes"] = {
            p: mean_stderr([r["values"]["forward_passes"].get(p, 0) for r in records])[0] for p in phases
        }
        if not o.count:
            value, stderr = mean_stderr([r["values"]["n_mses"] for r in records])
            return Summary(value=value, stderr=stderr, values=values)
        counts: dict[str, dict[str, Any]] = {}
        for t in o.count_thresholds:
            key = f"{t:g}"
            mean, err = mean_stderr([r["values"]["counts"][key] for r in records])
            counts[key] = {"mean": mean, "stderr": err}
        values["counts"] = counts
        values["truncated_images"] = sum(bool(r["values"].get("truncated")) for r in records)
        headline = f"{o.headline_threshold:g}"
        if headline not in counts:
            raise HarnessError(f"headline_threshold {o.headline_threshold} is not among count_thresholds")
        return Summary(value=counts[headline]["mean"], stderr=counts[headline]["stderr"], values=values)

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        from harness_plugins.metrics.sag_plots import plot_mses, plot_tree
        from harness.visuals import load_visuals

        visuals = load_visuals(Path(out_dir), result.run_id)
        written = {}
        for record in records:
            sample_id = record["sample_id"]
            if sample_id not in visuals or not record["values"]["mses"]:
                continue
            grid = int(result.values["grid"].split(":")[1])
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in sample_id)[:40]
            folder = Path(out_dir) / result.run_id
            plot_mses(folder / f"mses_{stem}.png", visuals[sample_id], record, grid)
            written[f"mses_{stem}"] = f"{result.run_id}/mses_{stem}.png"
            if record["values"].get("tree"):
                plot_tree(folder / f"tree_{stem}.png", visuals[sample_id], record, grid)
                written[f"tree_{stem}"] = f"{result.run_id}/tree_{stem}.png"
        return written


def _tree(root: tuple[int, ...], relative: dict, p0: float, root_conf: float) -> dict[str, Any]:
    """An MSE with its one- and two-patch deletions that were evaluated (for the tree plot)."""
    children = []
    for patch in root:
        child = tuple(p for p in root if p != patch)
        if child in relative:
            grandchildren = [
                {"removed": q, "relative": relative[g]}
                for q in child
                if (g := tuple(p for p in child if p != q)) in relative and g
            ]
            children.append({"removed": patch, "relative": relative[child], "children": grandchildren})
    return {"patches": list(root), "relative": root_conf / p0, "children": children}


def _histogram(sizes: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in sorted(sizes):
        out[str(s)] = out.get(str(s), 0) + 1
    return out


@harness.hookimpl
def register_metrics(register):
    register(Subexplanations)
