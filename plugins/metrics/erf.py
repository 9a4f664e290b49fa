"""Effective receptive fields of a central unit per stage (Luo et al. 2016; Raghu et al. 2021, Fig. 6).

For each analysed layer (default: each stage's output for CNNs and Swin, the last block of each
quarter of the depth for ViTs) the *central unit* is the sum over channels of the layer's output at
the central spatial position (row h // 2, column w // 2 of its feature map or patch grid; for ViTs
the patch token at that grid cell, prefix tokens excluded). Its ERF map is ``|d unit / d input|``
summed over RGB, per image normalised to sum 1 and averaged over images. One forward pass per
batch, one backward pass per layer (images are independent in eval mode, so a batch's gradients are
the per-image ones).

The size of a map is summarised by its RMS radius in input pixels,
``sqrt(sum_xy m(x, y) * ||(x, y) - c||^2)``, with ``c`` the centre of the unit's cell in input pixels.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

import harness
from harness.components import Metric, Options, Summary
from harness.errors import HarnessError
from harness.stats import mean_stderr

from .layers import LayerHooks, patch_grid, prefix_tokens, resolve_layers, short_label, split_patterns, transformer_blocks


def stage_layers(model: Any) -> list[str]:
    """ERF defaults: stage outputs (``*Stage`` modules, or ResNet's ``layerN``); else ViT quarter blocks."""
    root = model.module if hasattr(model, "module") else model
    stages = [n for n, m in root.named_modules() if n and type(m).__name__.endswith("Stage")]
    stages = [n for n in stages if not any(n.startswith(o + ".") for o in stages)]
    if not stages:
        stages = [n for n, _ in root.named_children() if re.fullmatch(r"layer\d+", n)]
    if stages:
        return stages
    blocks = transformer_blocks(root)
    if blocks:
        picks = sorted({max(0, math.ceil(len(blocks) * q / 4) - 1) for q in (1, 2, 3, 4)})
        return [blocks[i] for i in picks]
    from .layers import block_outputs

    return block_outputs(root)


class ERFOptions(Options):
    layers: list[str] = ["default"]
    """Layers whose central unit is analysed (glob patterns; ``default`` = stages / ViT quarter blocks)."""
    map_size: int = Field(56, ge=4, le=512)
    """Side of the averaged ERF maps kept in the result (area-pooled from the input resolution)."""

    @field_validator("layers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_patterns(value)


def central_unit(t: torch.Tensor, layout: str, prefix: int, grid: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(per-image central unit (B,), (row, col) of the centre, (h, w) of the map) of a layer output."""
    if layout == "tokens":
        n = t.shape[1] - prefix
        if grid is None or grid[0] * grid[1] != n:
            side = int(round(math.sqrt(n)))
            if side * side != n:
                raise HarnessError(f"cannot place {n} tokens on a square grid")
            grid = (side, side)
        h, w = grid
        r, c = h // 2, w // 2
        return t[:, prefix + r * w + c, :].sum(-1), (r, c), (h, w)
    if layout == "nhwc":
        h, w = t.shape[1], t.shape[2]
        return t[:, h // 2, w // 2, :].sum(-1), (h // 2, w // 2), (h, w)
    h, w = t.shape[2], t.shape[3]
    return t[:, :, h // 2, w // 2].sum(-1), (h // 2, w // 2), (h, w)


def rms_radius(maps: torch.Tensor, centre: tuple[float, float]) -> torch.Tensor:
    """RMS distance (px) from ``centre`` (y, x) of normalised maps (B, H, W)."""
    _, h, w = maps.shape
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    d2 = (ys[:, None] - centre[0]) ** 2 + (xs[None, :] - centre[1]) ** 2
    return (maps.to(torch.float64) * d2).sum((-2, -1)).sqrt()


class ERF(Metric):
    """Effective receptive field of a central unit per stage: averaged |gradient| maps and their RMS radius.

    value: the mean over layers of the ERF RMS radius (px), averaged over images; stderr over images.
    values: ``layers``, ``radius_px`` (per layer, mean over images), ``radius_px_of_mean_map`` (radius
    of the averaged map), ``maps`` (layers x map_size x map_size, each summing to 1), ``centre_px``.
    """

    id: ClassVar[str] = "erf"
    version: ClassVar[str] = "1"
    higher_is_better: ClassVar[bool | None] = None
    citation: ClassVar[str] = (
        "Luo, Li, Urtasun, Zemel. Understanding the Effective Receptive Field in Deep Convolutional Neural "
        "Networks. NeurIPS 2016; Raghu et al. Do Vision Transformers See Like Convolutional Neural Networks? NeurIPS 2021"
    )
    Options = ERFOptions

    def __init__(self, options: ERFOptions | None = None):
        super().__init__(options)
        self._layers: list[str] | None = None

    @classmethod
    def default_layers(cls, module: nn.Module) -> list[str]:
        """The layers ``-o metric.layers=default`` selects (for ``harness list layers``)."""
        return stage_layers(module)

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        model = ctx.model
        root = model.module
        if self._layers is None:
            self._layers = resolve_layers(model, list(self.options.layers), defaults=stage_layers)
        layers = self._layers
        inputs = batch.inputs(model).detach().clone().requires_grad_(True)
        b, _, height, width = inputs.shape
        outputs: list[torch.Tensor | None] = [None] * len(layers)
        hooks = LayerHooks(root, layers, lambda i, t: outputs.__setitem__(i, t))
        with torch.enable_grad(), hooks:
            root(inputs)
            hooks.check_once()
            layers_in_order = [layers[i] for i in hooks.order]
            nhwc = getattr(root, "output_fmt", "NCHW") == "NHWC"
            prefix = prefix_tokens(model)
            grid = patch_grid(model)
            units, centres = [], []
            for i in hooks.order:
                t = outputs[i]
                assert t is not None  # check_once: every hooked layer ran
                layout = "tokens" if t.dim() == 3 else ("nhwc" if nhwc else "nchw")
                if t.dim() not in (3, 4):
                    raise HarnessError(f"erf: layer {layers[i]!r} output has shape {tuple(t.shape)}; need a feature map or tokens")
                unit, (r, c), (h, w) = central_unit(t, layout, prefix if layout == "tokens" else 0, grid[0] if grid else None)
                units.append(unit)
                centres.append(((r + 0.5) * height / h, (c + 0.5) * width / w))
            grads = []
            for k, unit in enumerate(units):
                (g,) = torch.autograd.grad(unit.sum(), inputs, retain_graph=k < len(units) - 1)
                grads.append(g.detach().abs().sum(1).to(torch.float64))  # (B, H, W)
        outputs.clear()
        radii, pooled = [], []
        size = self.options.map_size
        for g, centre in zip(grads, centres):
            total = g.sum((-2, -1), keepdim=True)
            maps = g / total.clamp_min(1e-300)
            radius = rms_radius(maps, centre)
            radius[total.flatten() == 0] = math.nan
            radii.append(radius)
            small = F.adaptive_avg_pool2d(maps[:, None], size)[:, 0] * (height * width / (size * size))
            pooled.append(small.sum(0))
        records = []
        for k in range(b):
            values: dict[str, Any] = {"radius_px": [float(r[k]) for r in radii]}
            if k == 0:
                values.update(layers=layers_in_order, centre_px=centres, input_hw=[height, width],
                              map_sum=[p.tolist() for p in pooled], batch=b)
            records.append({"prediction": None, "values": values})
        return records

    def summarize(self, records, ctx) -> Summary:
        heads = [r["values"] for r in records if "layers" in r["values"]]
        layers = heads[0]["layers"]
        maps = sum(torch.tensor(h["map_sum"], dtype=torch.float64) for h in heads) / sum(h["batch"] for h in heads)
        radius = []
        for k in range(len(layers)):
            xs = [r["values"]["radius_px"][k] for r in records]
            good = [x for x in xs if x is not None and math.isfinite(x)]
            radius.append(sum(good) / len(good) if good else None)
        per_image = []
        for r in records:
            xs = [x for x in r["values"]["radius_px"] if x is not None and math.isfinite(x)]
            if xs:
                per_image.append(sum(xs) / len(xs))
        value, stderr = mean_stderr(per_image) if per_image else (math.nan, None)
        h, w = heads[0]["input_hw"]
        size = maps.shape[-1]
        scale = (h / size, w / size)
        mean_map_radius = [
            float(rms_radius(m[None], (cy / scale[0], cx / scale[1]))[0] * math.sqrt(scale[0] * scale[1]))
            for m, (cy, cx) in zip(maps, heads[0]["centre_px"])
        ]
        values = {
            "layers": layers,
            "radius_px": radius,
            "radius_px_of_mean_map": mean_map_radius,
            "centre_px": heads[0]["centre_px"],
            "input_hw": [h, w],
            "maps": maps.tolist(),
        }
        path, relative = ctx.artifact("erf.png")
        draw_erf(path, values, title=_title(ctx.model.id, ctx.model.random_init, len(records)))
        return Summary(value=value, stderr=stderr, values=values, artifacts={"erf": relative})

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        model = result.models[0]
        from harness.plotting import artifact_path

        path, relative = artifact_path(out_dir, result.run_id, "erf.png")
        draw_erf(path, result.values, title=_title(model.id, model.random_init, result.dataset.n_samples))
        return {"erf": relative}


def _title(model_id: str, random_init: bool, n: int) -> str:
    return f"Effective receptive field of the central unit: {model_id}{' (random init)' if random_init else ''}, {n} images"


def draw_erf(path: Path, values: dict[str, Any], *, title: str) -> None:
    """One panel per layer: the averaged ERF map (input extent), its RMS radius in the title."""
    import numpy as np

    from harness.plotting import pyplot

    plt = pyplot()
    maps = values["maps"]
    n = len(maps)
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows + 0.4), dpi=110, squeeze=False)
    h, w = values["input_hw"]
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        m = np.array(maps[k], dtype=float)
        ax.imshow(m / max(m.max(), 1e-300), cmap="magma", extent=(0, w, h, 0), vmin=0, vmax=1)
        r = values["radius_px"][k]
        ax.set_title(f"{short_label(values['layers'][k])}\nRMS radius {r:.0f} px" if r is not None else short_label(values["layers"][k]), fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@harness.hookimpl
def register_metrics(register):
    register(ERF)
