"""Sanity checks by randomisation: the Model Parameter Randomisation Test (Adebayo et al., NeurIPS 2018)
and the Random Logit Test (Sixt, Granz, Landgraf, ICML 2020).

``mprt``: the explanation of every image under the trained model (from the attribution cache) is
compared with its explanation under models whose layers are re-initialised, per layer (unit, see
``randomiser.py``), from the logits down to the input, cumulatively (cascading randomisation);
``mprt_independent`` randomises one unit at a time, the others trained. All images of a
batch go through the attributor together for each randomised model. Similarities per image and
layer: ``similarity.py`` (Spearman of the PAIR-normalised map and of its absolute value, SSIM, HOG).
Per-sample value: the mean over layers of the ``headline`` similarity; lower means the explanation
depends on the model's parameters, as it should (``higher_is_better = False``).

``random_logit``: similarity of the explanation of the target class ``c`` and of a class ``c'``
drawn uniformly from the other classes (seeded per sample), per image. Lower is better.

Every similarity is computed per image (no normalisation over the batch, unlike Quantus), so an
image's score does not depend on which images share its batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

import harness
from harness.components import Metric, Options, Summary
from harness.errors import HarnessError
from harness.stats import mean_stderr

from .insertion_deletion import choose_targets
from .layers import short_label, split_patterns
from .randomiser import Randomiser, random_values, resolve_units
from .similarity import SIMILARITIES, Similarity, SimilaritySettings, compare, prepare

ADEBAYO = (
    "Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim. Sanity Checks for Saliency Maps. NeurIPS 2018"
)
SIXT = (
    "Sixt, Granz, Landgraf. When Explanations Lie: Why Many Modified BP Attributions Fail. ICML 2020"
)


class SimilarityOptions(Options):
    target: Literal["predicted", "label"] = "predicted"
    """Class of the original explanation: the clean top-1 prediction, or the ground-truth label."""
    similarities: list[Similarity] = Field(list(SIMILARITIES), min_length=1)
    """Similarities computed per image: spearman_abs, spearman, ssim, hog (comma-separated)."""
    headline: Similarity = Field("spearman_abs", validate_default=True)
    """The similarity whose value is the per-sample score (must be among ``similarities``)."""
    percentile: float = Field(99.0, gt=0, le=100)
    """Upper percentile of PAIR's normalisation before Spearman (Adebayo et al.: 99)."""
    ssim_data_range: float = Field(2.0, gt=0)
    """SSIM's data range R (C1 = (0.01 R)^2, C2 = (0.03 R)^2) for maps min-max scaled to [0, 1]; 2 = what the
    reference code's scikit-image inferred for float images, 1 = the maps' actual range."""
    hog_cell: int = Field(16, ge=2)
    """HOG cell size in pixels (3 x 3 cells per block, 9 orientations, L2-Hys)."""
    hog_correlation: Literal["spearman", "pearson"] = "spearman"
    """How two HOG vectors are compared: Spearman (reference code) or Pearson (paper text)."""

    @field_validator("similarities", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_patterns(value) if isinstance(value, (str, list, tuple)) else value

    @field_validator("headline")
    @classmethod
    def _headline_computed(cls, value: str, info: ValidationInfo) -> str:
        chosen = info.data.get("similarities")
        if chosen is not None and value not in chosen:
            raise ValueError(f"{value!r} is not among the similarities computed ({', '.join(chosen)}); "
                             f"add it to -o metric.similarities")
        return value

    def settings(self) -> SimilaritySettings:
        return SimilaritySettings(percentile=self.percentile, ssim_data_range=self.ssim_data_range,
                                  hog_cell=self.hog_cell, hog_correlation=self.hog_correlation)

    def which(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.similarities))


class MPRTOptions(SimilarityOptions):
    layers: list[str] = ["blocks"]
    """Units randomised: ``blocks`` (stem, blocks, pre_logits, logits), ``stages``, ``modules`` (every layer
    with reset_parameters, as Quantus) or glob patterns over module names (comma-separated)."""
    init: Literal["reset_parameters", "normal"] = "reset_parameters"
    """Each module's own initialiser (tokens without one: N(0, normal_std^2)), or N(0, normal_std^2) everywhere."""
    normal_std: float = Field(0.02, gt=0)
    running_stats: Literal["keep", "reset"] = "keep"
    """BatchNorm running statistics: kept (reference code: not trainable) or reset as well (Quantus)."""
    randomised_target: Literal["predicted", "same"] = "predicted"
    """Class explained under a randomised model: its own top-1 (the paper's notebooks) or the original target (Quantus)."""

    @field_validator("layers", mode="before")
    @classmethod
    def _split_layers(cls, value: Any) -> Any:
        return split_patterns(value)


def uncached(attributor: Any) -> Any:
    """The attributor without the attribution cache (other wrappers, e.g. full precision, stay)."""
    from harness.cache import CachedAttributor

    return attributor.inner if isinstance(attributor, CachedAttributor) else attributor


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


class MPRT(Metric):
    """Model parameter randomisation test: similarity of the maps of the trained and layer-randomised models (lower is better).

    Per sample: ``score`` (mean over layers of the ``headline`` similarity, leaving out layers where it is
    undefined: a constant randomised map has no ranks), ``undefined_layers`` (how many), ``target``,
    ``layers`` (units, top-down), ``similarity`` ({name: per layer}), ``randomised_target`` (per layer).
    The result's values hold, per similarity, the mean, std and count over samples of each layer (the
    paper's curves), and ``undefined`` (the total of left-out layers).
    """

    id: ClassVar[str] = "mprt"
    order: ClassVar[Literal["cascading", "independent"]] = "cascading"
    higher_is_better: ClassVar[bool] = False
    needs_attributor: ClassVar[bool] = True
    default_attributor: ClassVar[str] = "saliency"
    citation: ClassVar[str] = ADEBAYO
    Options = MPRTOptions

    def __init__(self, options: MPRTOptions | None = None):
        super().__init__(options)
        self._randomisers: dict[int, Randomiser] = {}

    def randomiser(self, model: Any, seed: int) -> Randomiser:
        """The working copy for ``model`` (built once per run: the random values do not change between batches)."""
        key = id(model.module)
        if key not in self._randomisers:
            o = self.options
            units = resolve_units(model, o.layers, o.running_stats)
            values = random_values(model.module, units, seed, o.init, o.normal_std)
            marker = f"mprt:{model.weights_sha256}:{seed}:{o.init}:{o.normal_std}:{o.running_stats}"
            self._randomisers[key] = Randomiser(model, units, values, marker)
        return self._randomisers[key]

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        o = self.options
        model = ctx.model
        inputs = batch.inputs(model)
        logits = model.logits(inputs)
        target = choose_targets(logits, batch.labels, o.target)
        original = ctx.attributor.attribute(model, inputs, target, batch.seeds)
        attributor = uncached(ctx.attributor)  # randomised models' maps do not go into the cache
        settings, which = o.settings(), o.which()
        reference = prepare(original, which, settings)
        randomiser = self.randomiser(model, ctx.seed)
        visual = [i for i, s in enumerate(batch.samples) if s.id in ctx.visual_ids]
        labels: list[str] = []
        sims: dict[str, list[list[float]]] = {name: [] for name in which}
        explained: list[list[int]] = []
        kept_maps: dict[int, torch.Tensor] = {}
        shown = set(shown_steps(len(randomiser.units)))
        for step, unit in enumerate(randomiser.steps(self.order)):
            random_model = randomiser.copy
            if o.randomised_target == "predicted":
                chosen = random_model.logits(inputs).argmax(1)
            else:
                chosen = target
            maps = attributor.attribute(random_model, inputs, chosen, batch.seeds)
            for name, values in compare(reference, prepare(maps, which, settings), settings).items():
                sims[name].append(values.tolist())
            labels.append(unit.label)
            explained.append(chosen.tolist())
            if visual and step in shown:
                kept_maps[step] = display_scaled(maps[visual])
        for k, i in enumerate(visual):
            steps = {f"step_{j:03d}": m[k] for j, m in kept_maps.items()}
            ctx.keep_visual(batch.samples[i].id, image=model.denormalise(inputs[i : i + 1])[0].clamp(0, 1),
                            attribution=display_scaled(original[i : i + 1])[0], **steps)
        records = []
        for i, prediction in enumerate(logits.argmax(1).tolist()):
            per_layer = {name: [rows[i] for rows in sims[name]] for name in which}
            records.append({
                "prediction": prediction,
                "values": {
                    "score": _nanmean(per_layer[o.headline]),
                    "undefined_layers": sum(not math.isfinite(v) for v in per_layer[o.headline]),
                    "target": int(target[i]),
                    "layers": labels,
                    "similarity": per_layer,
                    "randomised_target": [row[i] for row in explained],
                },
            })
        return records

    def summarize(self, records, ctx) -> Summary:
        value, stderr = mean_stderr([r["values"]["score"] for r in records])
        layers = records[0]["values"]["layers"]
        if any(r["values"]["layers"] != layers for r in records):
            raise HarnessError("the samples file mixes different layer lists; start a fresh --out")
        curves = {}
        for name in self.options.which():
            table = torch.tensor([[_float(v) for v in r["values"]["similarity"][name]] for r in records], dtype=torch.float64)
            finite = torch.isfinite(table)
            n = finite.sum(0)
            filled = torch.where(finite, table, torch.zeros_like(table))
            mean = filled.sum(0) / n.clamp_min(1)
            var = torch.where(finite, (table - mean).square(), torch.zeros_like(table)).sum(0) / (n - 1).clamp_min(1)
            curves[name] = {
                "mean": [m if c else None for m, c in zip(mean.tolist(), n.tolist())],
                "std": [s if c > 1 else None for s, c in zip(var.sqrt().tolist(), n.tolist())],
                "n": n.tolist(),
            }
        undefined = sum(int(r["values"].get("undefined_layers") or 0) for r in records)
        return Summary(value=value, stderr=stderr, values={
            "layers": layers, "order": self.order, "headline": self.options.headline, "curves": curves,
            "undefined": undefined,
        })

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        from harness.visuals import load_visuals

        folder = Path(out_dir) / result.run_id
        folder.mkdir(parents=True, exist_ok=True)
        label = self.id if result.attributor is None else f"{self.id} ({result.attributor.id})"
        written = {}
        curves = result.values.get("curves") or {}
        layers = result.values.get("layers") or []
        if curves and layers:
            draw_layer_curves(folder / "curve.png", layers, curves, title=f"{label}, {self.order}: "
                              f"mean {self.options.headline} {result.value:.3f}",
                              xlabel="randomised from the logits down to" if self.order == "cascading" else "randomised layer")
            written["curve"] = f"{result.run_id}/curve.png"
        visuals = load_visuals(Path(out_dir), result.run_id)
        rows = [(sid, v) for sid, v in visuals.items() if "attribution" in v and any(k.startswith("step_") for k in v)]
        if rows and layers:
            draw_map_grid(folder / "maps.png", rows[:4], layers, title=f"{label}: {self.order} randomisation")
            written["maps"] = f"{result.run_id}/maps.png"
        return written


def display_scaled(maps: torch.Tensor) -> torch.Tensor:
    """Maps divided by their own max |value| (for the float16 visuals: a randomised model's gradients can be
    far below float16's range); plots normalise them anyway."""
    m = maps.detach().float().cpu()
    peak = m.flatten(1).abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    return m / peak.view(-1, *([1] * (m.dim() - 1)))


def shown_steps(n_steps: int, columns: int = 8) -> list[int]:
    """The randomisation steps whose maps are kept for the map grid: up to ``columns``, evenly spaced, first and last included."""
    if n_steps <= 0:
        return []
    return sorted({round(j * (n_steps - 1) / max(1, columns - 1)) for j in range(min(columns, n_steps))})


class MPRTIndependent(MPRT):
    """Model parameter randomisation test, independent: one layer randomised at a time, the others trained (lower is better).

    Records and values as ``mprt``; step k randomises only the k-th unit from the top.
    """

    id: ClassVar[str] = "mprt_independent"
    order: ClassVar[Literal["cascading", "independent"]] = "independent"


def draw_layer_curves(path: Path, layers: list[str], curves: dict[str, dict[str, list]], *, title: str,
                      xlabel: str = "randomised from the logits down to") -> None:
    """Adebayo et al. Fig. 4 style: similarity (mean +- std over images) against the randomised layer, logits first."""
    from harness.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * len(layers) + 2.5), 3.8), dpi=120)
    xs = list(range(len(layers)))
    for name, curve in curves.items():
        mean = [math.nan if v is None else v for v in curve["mean"]]
        std = [0.0 if v is None else v for v in curve["std"]]
        ax.plot(xs, mean, marker="o", markersize=3, linewidth=1.6, label=name)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels([short_label(layer) for layer in layers], rotation=60, ha="right", fontsize=7)
    ax.set(title=title, xlabel=xlabel, ylabel="similarity to the original map", ylim=(-1.05, 1.05))
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_map_grid(path: Path, rows: list[tuple[str, dict[str, torch.Tensor]]], layers: list[str], *, title: str,
                  columns: int = 8) -> None:
    """Adebayo et al. Fig. 2 style: per image, the original map then the maps after each randomisation step."""
    from harness.plotting import normalise_map, pyplot

    plt = pyplot()
    picks = shown_steps(len(layers), columns)
    n_cols = 2 + len(picks)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.5 * n_cols, 1.6 * len(rows) + 0.4), dpi=110, squeeze=False)
    for r, (sample_id, v) in enumerate(rows):
        panels = [(sample_id, v["image"].permute(1, 2, 0).clamp(0, 1).numpy(), None),
                  ("original", normalise_map(v["attribution"].abs()).numpy(), "gray")]
        panels += [(short_label(layers[j]), normalise_map(v[f"step_{j:03d}"].abs()).numpy(), "gray")
                   for j in picks if f"step_{j:03d}" in v]
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(panels):
                name, picture, cmap = panels[c]
                ax.imshow(picture, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
                ax.set_title(name, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class RandomLogitOptions(SimilarityOptions):
    headline: Similarity = Field("ssim", validate_default=True)
    """The similarity whose value is the per-sample score (Sixt et al. report SSIM)."""


def other_class(seed: int, target: int, n_classes: int) -> int:
    """A class drawn uniformly from the ``n_classes - 1`` classes other than ``target``, seeded per sample."""
    if n_classes < 2:
        raise HarnessError("the random logit test needs a model with at least 2 classes")
    draw = int(torch.randint(n_classes - 1, (1,), generator=torch.Generator().manual_seed(seed)))
    return draw + (draw >= target)


class RandomLogit(Metric):
    """Random logit test: similarity of the maps for the target class and a random other class (lower is better).

    Per sample: ``score`` (the ``headline`` similarity, SSIM by default), ``target``, ``random_class``
    and ``similarity`` ({name: value}). The random class is drawn from the per-sample seed, so it does
    not depend on batching, resume or the number of processes.
    """

    id: ClassVar[str] = "random_logit"
    higher_is_better: ClassVar[bool] = False
    needs_attributor: ClassVar[bool] = True
    default_attributor: ClassVar[str] = "saliency"
    citation: ClassVar[str] = SIXT
    Options = RandomLogitOptions

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        o = self.options
        model = ctx.model
        inputs = batch.inputs(model)
        logits = model.logits(inputs)
        target = choose_targets(logits, batch.labels, o.target)
        other = torch.tensor([other_class(s, int(t), logits.shape[1]) for s, t in zip(batch.seeds, target.tolist())],
                             device=target.device)
        both = ctx.attributor.attribute(model, torch.cat([inputs, inputs]), torch.cat([target, other]), [*batch.seeds, *batch.seeds])
        maps, random_maps = both[: len(inputs)], both[len(inputs) :]
        settings = o.settings()
        sims = compare(prepare(maps, o.which(), settings), prepare(random_maps, o.which(), settings), settings)
        for i, sample in enumerate(batch.samples):
            ctx.keep_visual(sample.id, image=model.denormalise(inputs[i : i + 1])[0].clamp(0, 1),
                            attribution=maps[i], random_class_attribution=random_maps[i])
        return [
            {
                "prediction": int(p),
                "values": {
                    "score": float(sims[o.headline][i]),
                    "target": int(target[i]),
                    "random_class": int(other[i]),
                    "similarity": {name: float(v[i]) for name, v in sims.items()},
                },
            }
            for i, p in enumerate(logits.argmax(1).tolist())
        ]

    def summarize(self, records, ctx) -> Summary:
        value, stderr = mean_stderr([r["values"]["score"] for r in records])
        means = {name: mean_stderr([r["values"]["similarity"].get(name) for r in records])[0] for name in self.options.which()}
        return Summary(value=value, stderr=stderr, values={"headline": self.options.headline, "similarity": means})

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        from harness.plotting import normalise_map, pyplot
        from harness.visuals import load_visuals

        visuals = [(sid, v) for sid, v in load_visuals(Path(out_dir), result.run_id).items() if "random_class_attribution" in v]
        if not visuals:
            return {}
        by_id = {r["sample_id"]: r["values"] for r in records}
        plt = pyplot()
        fig, axes = plt.subplots(3, len(visuals[:4]), figsize=(2.4 * len(visuals[:4]), 7.2), dpi=110, squeeze=False)
        for c, (sid, v) in enumerate(visuals[:4]):
            rec = by_id.get(sid, {})
            axes[0, c].imshow(v["image"].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[0, c].set_title(sid, fontsize=7)
            axes[1, c].imshow(normalise_map(v["attribution"].abs()).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[1, c].set_title(f"class {rec.get('target', '?')}", fontsize=7)
            axes[2, c].imshow(normalise_map(v["random_class_attribution"].abs()).numpy(), cmap="gray", vmin=0, vmax=1)
            score = rec.get("score")
            axes[2, c].set_title(f"class {rec.get('random_class', '?')}: {self.options.headline} "
                                 f"{'n/a' if score is None else f'{score:.2f}'}", fontsize=7)
            for r in range(3):
                axes[r, c].axis("off")
        label = self.id if result.attributor is None else f"{self.id} ({result.attributor.id})"
        fig.suptitle(f"{label}: mean {self.options.headline} {result.value:.3f}", fontsize=9)
        fig.tight_layout()
        folder = Path(out_dir) / result.run_id
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / "maps.png")
        plt.close(fig)
        return {"maps": f"{result.run_id}/maps.png"}


@harness.hookimpl
def register_metrics(register):
    register(MPRT)
    register(MPRTIndependent)
    register(RandomLogit)
