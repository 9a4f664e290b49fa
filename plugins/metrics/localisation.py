"""Localisation: does the explanation of the labelled class fall on the labelled object's boxes?

Per image, with the map ``a`` (H x W, the attributor's output in the model's input frame) and the
object mask ``B`` (the union of the image's boxes, carried into the input frame by the model's own
preprocessing; see ``harness_plugins.boxes`` for where boxes come from):

- ``pointing_game`` (Zhang et al., IJCV 2018): a hit when the map's maximum (the first in row-major
  order when tied, as ``torch.argmax``) lies within ``tolerance`` pixels (15) of the object. As in
  TorchRay's benchmark, the tolerance is a Euclidean disk (distance < 15) at the original image's
  size: the boxes are dilated there, before the preprocessing. Accuracy = hits / (hits + misses) per
  class, averaged over classes (``average=images``: over images). Optional Gaussian smoothing of the
  map first (``smooth``, sigma as a fraction of the longer side; TorchRay uses 0.02 for gradient maps).
- ``relevance_mass`` (Arras, Osman, Samek, Information Fusion 2022: relevance mass accuracy; equal to
  the energy-based pointing game of Wang et al., Score-CAM, CVPRW 2020): the share of the positive map
  that lies in the box, ``sum_B a+ / sum a+`` with ``a+ = max(a, 0)`` (``positive=abs``: ``|a|``, as
  clevr-xai). Undefined (skipped, counted) for a map with no positive mass.
- ``relevance_rank`` (Arras et al. 2022, relevance rank accuracy): with K the number of box pixels,
  the fraction of the K highest-ranked pixels (ties by pixel index) that lie in the box.
- ``localisation_auc`` (Fawcett 2006, as Quantus's ``AUC``): the ROC AUC of the map as a score
  separating box pixels from the others (tied scores count one half: the Mann-Whitney statistic).
  Undefined when the box covers none or all of the input.

All are per image and higher is better. Samples without boxes, or whose boxes the crop removes
entirely, are skipped and counted (``n_without_box``, ``n_box_cropped``). Quantus departs here: its
pointing game has no tolerance and counts any tied maximum; its relevance mass uses the signed map.
The class explained is the label by default (the boxes are the labelled object's).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

import harness
from harness.components import Metric, Options, Summary
from harness.errors import HarnessError
from harness.stats import mean_stderr

from .insertion_deletion import choose_targets

ZHANG = (
    "Zhang, Bargal, Lin, Brandt, Shen, Sclaroff. Top-down Neural Attention by Excitation Backprop. "
    "IJCV 2018"
)
ARRAS = (
    "Arras, Osman, Samek. CLEVR-XAI: A benchmark dataset for the ground truth evaluation of neural "
    "network explanations. Information Fusion 2022"
)
FAWCETT = "Fawcett. An introduction to ROC analysis. Pattern Recognition Letters 2006"


class LocalisationOptions(Options):
    target: Literal["label", "predicted"] = "label"
    """The class explained: the ground-truth label (the prediction where there is none), or the top-1 prediction."""
    boxes: str | None = None
    """Where boxes come from: a folder of ImageNet/VOC .xml files, a boxes .json or a Kaggle .csv; unset = found."""

    @field_validator("boxes")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is not None:
            path = Path(value).expanduser()
            if not path.exists():
                raise ValueError(f"{value} does not exist")
            if path.is_file() and path.suffix.lower() not in (".json", ".csv"):
                raise ValueError("give a folder of .xml files, a .json or a .csv file")
        return value


class PointingGameOptions(LocalisationOptions):
    tolerance: int = Field(15, ge=0)
    """Pixels (at the original image size) the maximum may lie from the object (Zhang et al.: 15)."""
    average: Literal["classes", "images"] = "classes"
    """Accuracy per class then the mean over classes (Zhang et al., TorchRay), or the mean over images."""
    smooth: float = Field(0.0, ge=0, le=1)
    """Gaussian smoothing of the map before the maximum: sigma as a fraction of its longer side (0: none)."""


class RelevanceMassOptions(LocalisationOptions):
    positive: Literal["clip", "abs"] = "clip"
    """The relevance counted: the positive part max(a, 0) (energy-based pointing game), or |a| (clevr-xai)."""


# -- the scores ---------------------------------------------------------------------------------------
def argmax_points(maps: torch.Tensor, smooth: float = 0.0) -> torch.Tensor:
    """(B, 2) (row, column) of each map's maximum (the first in row-major order), after optional smoothing."""
    maps = maps.detach().float()
    if smooth > 0:
        from harness_plugins.maskers.fills import gaussian_blur

        sigma = smooth * max(maps.shape[-2:])
        size = 2 * math.ceil(3 * sigma) + 1
        maps = gaussian_blur(maps[:, None], size, sigma)[:, 0]
    flat = maps.reshape(len(maps), -1).argmax(1)
    return torch.stack([flat // maps.shape[-1], flat % maps.shape[-1]], dim=1)


def pointing_hits(points: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether each point (row, column) lies in its (H, W) region."""
    index = torch.arange(len(points), device=regions.device)
    return regions[index, points[:, 0].to(regions.device), points[:, 1].to(regions.device)]


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor, positive: str = "clip") -> torch.Tensor:
    """(B,) float64 share of the relevance inside the mask; NaN where the map has no relevance."""
    a = maps.detach().reshape(len(maps), -1).double()
    a = a.abs() if positive == "abs" else a.clamp_min(0)
    total = a.sum(1)
    inside = (a * masks.reshape(len(masks), -1).to(a)).sum(1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1.0), math.nan)


def relevance_rank(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) float64 fraction of the K top-ranked pixels (K = mask size; ties by index) inside the mask."""
    a = maps.detach().reshape(len(maps), -1).double()
    m = masks.reshape(len(masks), -1)
    order = torch.sort(-a, dim=1, stable=True).indices
    out = torch.full((len(a),), math.nan, dtype=torch.float64)
    for i in range(len(a)):
        k = int(m[i].sum())
        if k and bool(a[i].isfinite().all()):
            out[i] = m[i][order[i, :k]].double().sum() / k
    return out


def midranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks."""
    ordered, position = torch.sort(values, stable=True)
    _, counts = torch.unique_consecutive(ordered, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = (ends - (counts.double() - 1) / 2).repeat_interleave(counts)
    return torch.empty_like(mean_rank).scatter_(0, position, mean_rank)


def roc_auc(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) float64 ROC AUC of each map separating mask pixels from the rest; NaN when one side is
    empty or the map is not finite."""
    a = maps.detach().reshape(len(maps), -1).double()
    m = masks.reshape(len(masks), -1).bool()
    out = torch.full((len(a),), math.nan, dtype=torch.float64)
    for i in range(len(a)):
        pos = int(m[i].sum())
        neg = m.shape[1] - pos
        if pos and neg and bool(a[i].isfinite().all()):
            out[i] = (midranks(a[i])[m[i]].sum() - pos * (pos + 1) / 2) / (pos * neg)
    return out


def per_sample(key: str, scores: torch.Tensor, maps: torch.Tensor) -> list[dict[str, Any]]:
    """``[{key: value}]``: None where the score is undefined for a finite map (skipped and counted), NaN
    where the map itself is not finite (reported as a non-finite value)."""
    finite = maps.detach().reshape(len(maps), -1).isfinite().all(1).tolist()
    return [{key: (None if ok else math.nan) if math.isnan(v) else v} for v, ok in zip(scores.tolist(), finite)]


# -- the metrics ----------------------------------------------------------------------------------------
class LocalisationMetric(Metric):
    """Shared engine: boxes per sample, masks in the input frame, one map per sample with a box."""

    needs_attributor: ClassVar[bool] = True
    default_attributor: ClassVar[str] = "saliency"
    higher_is_better: ClassVar[bool] = True
    key: ClassVar[str]
    Options: ClassVar[type[Options]] = LocalisationOptions

    def _finder(self):
        from harness_plugins.boxes import BoxFinder

        if getattr(self, "_box_finder", None) is None:
            self._box_finder = BoxFinder(self.options.boxes)
        return self._box_finder

    def samples_identity(self, samples: list[Any], cache: Any) -> dict[str, str]:
        """The digest of the files the run's boxes come from, in sample order (part of the run id: other
        boxes are another run); called by the runner before the identity is taken."""
        from harness.identity import combined_sha256

        finder, seen, parts = self._finder(), {}, []
        for sample in samples:
            source = finder.source_of(sample)
            if source is None:
                parts.append("-")
                continue
            if source not in seen:
                try:
                    seen[source] = cache.digest(source).sha256
                except OSError as exc:
                    raise HarnessError(f"boxes: cannot read {source}: {exc.strerror or exc}") from None
            parts.append(seen[source])
        self._boxes_identity = {"boxes_sha256": combined_sha256(parts)}
        return self._boxes_identity

    def content_identity(self) -> dict[str, str]:
        """What :meth:`samples_identity` found (empty before the runner asked)."""
        return dict(getattr(self, "_boxes_identity", {}))

    def tolerance(self) -> float:
        """Dilation of the boxes at the original size for the scored region (pointing game only)."""
        return 0.0

    def scores(self, maps: torch.Tensor, masks: torch.Tensor, regions: torch.Tensor) -> list[dict[str, Any]]:
        """Per-sample values (the headline under ``key``; NaN for undefined) of maps with boxes."""
        raise NotImplementedError

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        from harness_plugins.boxes import input_masks

        model = ctx.model
        inputs = batch.inputs(model)
        logits = model.logits(inputs)
        target = choose_targets(logits, batch.labels, self.options.target)
        finder = self._finder()
        boxes: list[Any] = []  # per sample, its boxes in image pixels, or None
        for sample, image in zip(batch.samples, batch.images):
            found = finder.find(sample)
            boxes.append(found.scaled(*image.size) if found is not None and found.boxes else None)
        records: list[dict[str, Any]] = [
            {"prediction": int(p), "values": {"target": int(t), "box": "missing", self.key: None}}
            for p, t in zip(logits.argmax(1).tolist(), target.tolist())
        ]
        have = [i for i, b in enumerate(boxes) if b]
        if not have:
            return records
        images = [batch.images[i] for i in have]
        masks = input_masks(model, images, [boxes[i] for i in have])
        tolerance = self.tolerance()
        regions = input_masks(model, images, [boxes[i] for i in have], tolerance) if tolerance > 0 else masks
        for row, i in enumerate(have):
            records[i]["values"]["boxes"] = [[round(v, 3) for v in box] for box in boxes[i]]
            records[i]["values"]["box"] = "ok" if bool(masks[row].any()) else "cropped"
        scored = [row for row, i in enumerate(have) if records[i]["values"]["box"] == "ok"]
        if not scored:
            return records
        index = torch.tensor([have[row] for row in scored], device=inputs.device)
        maps = ctx.attributor.attribute(model, inputs[index], target[index], [batch.seeds[int(i)] for i in index])
        rows = torch.tensor(scored, device=masks.device)
        mask_rows, region_rows = masks[rows].to(maps.device), regions[rows].to(maps.device)
        for j, values in enumerate(self.scores(maps, mask_rows, region_rows)):
            i = int(index[j])
            records[i]["values"].update(values)
            records[i]["values"]["box_fraction"] = float(mask_rows[j].float().mean())
            ctx.keep_visual(batch.samples[i].id, image=model.denormalise(inputs[i : i + 1])[0].clamp(0, 1),
                            attribution=maps[j], box=mask_rows[j].float(), region=region_rows[j].float())
        return records

    def counts(self, records: list[dict[str, Any]]) -> dict[str, int]:
        """How many samples were scored, had no box, had their box cropped away, or were undefined."""
        box = [r["values"].get("box") for r in records]
        scored = [r for r, b in zip(records, box) if b == "ok"]
        return {
            "n_scored": sum(1 for r in scored if r["values"].get(self.key) is not None),
            "n_without_box": box.count("missing"),
            "n_box_cropped": box.count("cropped"),
            "n_undefined": sum(1 for r in scored if r["values"].get(self.key) is None),
        }

    def defined(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records with a headline value; a one-line error when there is none."""
        kept = [r for r in records if r["values"].get("box") == "ok" and r["values"].get(self.key) is not None]
        if not kept:
            c = self.counts(records)
            raise HarnessError(
                f"{self.id}: no sample could be scored ({len(records)} sample(s): {c['n_without_box']} without a box, "
                f"{c['n_box_cropped']} with the box cropped away, {c['n_undefined']} undefined); give boxes with "
                "-o metric.boxes=PATH (a folder of ImageNet .xml files, a boxes .json or LOC_val_solution.csv)"
            )
        return kept

    def summarize(self, records, ctx) -> Summary:
        kept = self.defined(records)
        value, stderr = mean_stderr([r["values"][self.key] for r in kept])
        return Summary(value=value, stderr=stderr, values=self.counts(records))

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        from harness.visuals import load_visuals

        visuals = load_visuals(Path(out_dir), result.run_id)
        panels = [(sid, v) for sid, v in visuals.items() if "box" in v]
        if not panels:
            return {}
        folder = Path(out_dir) / result.run_id
        folder.mkdir(parents=True, exist_ok=True)
        values = {r["sample_id"]: r["values"] for r in records}
        label = self.id if result.attributor is None else f"{self.id} ({result.attributor.id})"
        plot_boxes(folder / "boxes.png", panels[:4], values, self.key, title=f"{label}: {result.value:.3f}")
        return {"boxes": f"{result.run_id}/boxes.png"}


def plot_boxes(path: Path, panels: list[tuple[str, dict[str, torch.Tensor]]], values: dict[str, dict[str, Any]],
               key: str, *, title: str) -> None:
    """Per sample: the map over the image, the object's box outline (green), the tolerance region
    (dashed) and the map's maximum (a cross: green for a hit, red for a miss), as in Zhang et al.'s figures."""
    from harness.plotting import normalise_map, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3.1), dpi=110, squeeze=False)
    for ax, (sid, v) in zip(axes[0], panels):
        ax.imshow(v["image"].permute(1, 2, 0).clamp(0, 1).numpy())
        ax.imshow(normalise_map(v["attribution"]).numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.contour(v["box"].numpy(), levels=[0.5], colors="lime", linewidths=1.5)
        if not torch.equal(v["region"], v["box"]):
            ax.contour(v["region"].numpy(), levels=[0.5], colors="white", linewidths=1, linestyles="dashed")
        record = values.get(sid, {})
        if record.get("point") is not None:
            r, c = record["point"]
            ax.plot([c], [r], marker="x", markersize=10, mew=2.5, color="lime" if record.get("hit") else "red")
        score = record.get(key)
        ax.set_title(f"{sid}: {score:.3f}" if isinstance(score, float) else sid, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class PointingGame(LocalisationMetric):
    """Pointing game: the map's maximum within 15 px of the object's boxes (Zhang et al. 2018); higher is better."""

    id: ClassVar[str] = "pointing_game"
    citation: ClassVar[str] = ZHANG
    Options = PointingGameOptions
    key = "hit"

    def tolerance(self) -> float:
        return float(self.options.tolerance)

    def scores(self, maps, masks, regions) -> list[dict[str, Any]]:
        points = argmax_points(maps, self.options.smooth)
        finite = maps.detach().reshape(len(maps), -1).isfinite().all(1).cpu()
        hits = torch.where(finite, pointing_hits(points, regions).double().cpu(), math.nan)
        return [{**v, "point": p} for v, p in zip(per_sample("hit", hits, maps), points.tolist())]

    def summarize(self, records, ctx) -> Summary:
        kept = self.defined(records)
        image_mean, image_stderr = mean_stderr([r["values"]["hit"] for r in kept])
        by_class: dict[int, list[float]] = {}
        for r in kept:
            by_class.setdefault(r["values"]["target"], []).append(r["values"]["hit"])
        class_accuracy = [sum(v) / len(v) for v in by_class.values()]
        class_mean, class_stderr = mean_stderr(class_accuracy)
        values = {**self.counts(records), "image_mean": image_mean, "class_mean": class_mean, "n_classes": len(by_class),
                  "hits": int(sum(r["values"]["hit"] for r in kept))}
        if self.options.average == "classes":
            return Summary(value=class_mean, stderr=class_stderr, values=values)
        return Summary(value=image_mean, stderr=image_stderr, values=values)


class RelevanceMass(LocalisationMetric):
    """Relevance mass accuracy / energy-based pointing game: share of the positive map in the box (Arras et al. 2022)."""

    id: ClassVar[str] = "relevance_mass"
    citation: ClassVar[str] = ARRAS + "; Wang et al. Score-CAM. CVPR Workshops 2020"
    Options = RelevanceMassOptions
    key = "mass"

    def scores(self, maps, masks, regions) -> list[dict[str, Any]]:
        return per_sample("mass", relevance_mass(maps, masks, self.options.positive), maps)


class RelevanceRank(LocalisationMetric):
    """Relevance rank accuracy: share of the top-K pixels (K = box size) inside the box (Arras et al. 2022)."""

    id: ClassVar[str] = "relevance_rank"
    citation: ClassVar[str] = ARRAS
    key = "rank"

    def scores(self, maps, masks, regions) -> list[dict[str, Any]]:
        return per_sample("rank", relevance_rank(maps, masks), maps)


class LocalisationAUC(LocalisationMetric):
    """ROC AUC of the map as a detector of the object's box pixels (Fawcett 2006; Quantus AUC)."""

    id: ClassVar[str] = "localisation_auc"
    citation: ClassVar[str] = FAWCETT
    key = "auc"

    def scores(self, maps, masks, regions) -> list[dict[str, Any]]:
        return per_sample("auc", roc_auc(maps, masks), maps)


@harness.hookimpl
def register_metrics(register):
    register(PointingGame)
    register(RelevanceMass)
    register(RelevanceRank)
    register(LocalisationAUC)
