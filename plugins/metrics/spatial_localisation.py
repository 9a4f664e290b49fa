"""Spatial localisation of token representations (Raghu et al. 2021, Sec. 6, Fig. 9, 10 and D.3).

For one layer (default: the output of the model's final block; for CNNs its final stage's feature map),
every output-token position ``p`` (prefix tokens such as CLS, distillation and registers dropped) is
compared with every input patch position ``q``: the model input (the preprocessed tensor) is cut into
the same grid as the tokens (ViT patch 16 at 224 px: 14 x 14 patches of 3 x 16 x 16 values; a
ResNet / ConvNeXt / Swin final stage at 224 px: 7 x 7 cells of 32 x 32 px). The comparison is linear
CKA across images between ``X_p`` (m x d, the token) and ``P_q`` (m x 3 s s, the input patch's values),
in the minibatch form with the unbiased HSIC_1 of the ``cka`` metric: per minibatch of n images all P
token grams and all Q patch grams are formed at once (batched GEMMs), U-centred, and
``HSIC_1(K_p, L_q)`` for all (p, q) is one GEMM; the sums over minibatches give
``CKA(p, q) = sum HSIC_1(K_p, L_q) / sqrt(sum HSIC_1(K_p, K_p) * sum HSIC_1(L_q, L_q))``.

The grid is derived from the layer's output shape and the input size: (B, T, C) tokens use the
model's patch grid (timm ``patch_embed.grid_size``) or the grid with the input's aspect ratio;
(B, C, H, W) maps (or (B, H, W, C) when the model's ``output_fmt`` is NHWC, e.g. Swin) use (H, W).
The input must split evenly into that grid.

Minibatches, the small-data fallback and the records follow ``cka``: each chunk's HSIC sums ride on
its first record, so ``--resume`` and merged samples files reproduce an uninterrupted run exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

import harness
from harness.components import Metric, Options, Summary
from harness.errors import HarnessError

from .cka import centred_batches, chunk_records, cka_matrix, collect_chunks, minibatch_plan
from .layers import LayerHooks, block_outputs, no_autocast, patch_grid, prefix_tokens, resolve_layers, unwrap

CITATION = (
    "Raghu, Unterthiner, Kornblith, Zhang, Dosovitskiy. Do Vision Transformers See Like Convolutional "
    "Neural Networks? NeurIPS 2021; Kornblith, Norouzi, Lee, Hinton. Similarity of Neural Network "
    "Representations Revisited. ICML 2019"
)


# -- geometry -----------------------------------------------------------------------------------------------
def final_layer(model: Any) -> list[str]:
    """The default layer: the output of the model's last block (definition order)."""
    blocks = block_outputs(unwrap(model))
    return blocks[-1:]


def _grid_for(n: int, height: int, width: int) -> tuple[int, int] | None:
    """The (rows, cols) grid of ``n`` cells with the input's aspect ratio, if one exists."""
    for rows in range(1, n + 1):
        if n % rows == 0 and rows * width == (n // rows) * height:
            return rows, n // rows
    return None


def to_positions(t: torch.Tensor, prefix: int, channels_last: bool, grid_hint: tuple[int, int] | None,
                 input_hw: tuple[int, int], where: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, P, C) token representations (row-major positions) and their (rows, cols) grid from a layer output."""
    if t.dim() == 3:
        tokens = t[:, prefix:]
        n = tokens.shape[1]
        grid = grid_hint if grid_hint is not None and grid_hint[0] * grid_hint[1] == n else _grid_for(n, *input_hw)
        if grid is None:
            raise HarnessError(
                f"{where}: cannot place its {n} tokens ({prefix} prefix token(s) dropped) on a grid with the "
                f"input's aspect ratio {input_hw[0]}x{input_hw[1]}; choose a layer with -o metric.layer=NAME"
            )
        return tokens, grid
    if t.dim() == 4:
        fmap = t if channels_last else t.permute(0, 2, 3, 1)  # (B, H, W, C)
        return fmap.reshape(fmap.shape[0], -1, fmap.shape[-1]), (int(fmap.shape[1]), int(fmap.shape[2]))
    raise HarnessError(
        f"{where} outputs shape {tuple(t.shape)}: spatial_localisation needs tokens (B, T, C) or a feature map "
        "(B, C, H, W); choose a layer before global pooling with -o metric.layer=NAME"
    )


def cell_size(grid: tuple[int, int], input_hw: tuple[int, int], where: str) -> tuple[int, int]:
    """Pixels per grid cell; the input must split evenly into the grid."""
    (gh, gw), (h, w) = grid, input_hw
    if h % gh or w % gw:
        raise HarnessError(
            f"{where}: the {h}x{w} input does not split evenly into its {gh}x{gw} grid of positions; "
            "use an input size that is a multiple of the grid (or another layer)"
        )
    return h // gh, w // gw


def patchify(inputs: torch.Tensor, cell: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, Q, C * sh * sw): the input cut into cells of ``cell`` px, row-major."""
    b, c, h, w = inputs.shape
    sh, sw = cell
    x = inputs.reshape(b, c, h // sh, sh, w // sw, sw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // sh) * (w // sw), c * sh * sw)


def position_grams(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All per-position grams of (B, P, d) representations at once: (P, B, B) float64.

    The first image's representation is subtracted per position first (a constant per minibatch,
    which U-centring removes exactly; it keeps float32 precise under large common offsets).
    """
    x = x.detach().to(dtype)
    centred = (x - x[:1]).transpose(0, 1)  # (P, B, d)
    return torch.bmm(centred, centred.transpose(1, 2)).to(torch.float64)


# -- the score from a CKA matrix ------------------------------------------------------------------------------
def localisation(cka: torch.Tensor, grid: tuple[int, int], cell: tuple[int, int]) -> dict[str, Any]:
    """Peaks, score and distances from a (P, Q) CKA matrix on one grid (NaN = undefined entries).

    A token's peak is the input position of its largest defined CKA (ties: the lowest index). Rows
    with no defined entry are left out of every mean.
    """
    gh, gw = grid
    finite = torch.isfinite(cka)
    masked = torch.where(finite, cka, torch.full_like(cka, -math.inf))
    peaks = masked.argmax(1)
    ok = finite.any(1)
    pos = torch.arange(gh * gw)
    dy = (peaks // gw - pos // gw).double()
    dx = (peaks % gw - pos % gw).double()
    cells = torch.sqrt(dy**2 + dx**2)
    pixels = torch.sqrt((dy * cell[0]) ** 2 + (dx * cell[1]) ** 2)
    own = cka.diagonal()

    def mean(v: torch.Tensor) -> float:
        v = v[ok & torch.isfinite(v)]
        return float(v.double().mean()) if v.numel() else math.nan

    return {
        "score": mean((peaks == pos).double()),
        "mean_distance_cells": mean(cells),
        "mean_distance_px": mean(pixels),
        "own_cka": mean(own),
        "peak_cka": mean(masked.max(1).values),
        "peaks": [int(q) if good else None for q, good in zip(peaks.tolist(), ok.tolist())],
        "defined_tokens": int(ok.sum()),
    }


# -- options ------------------------------------------------------------------------------------------------
class SpatialLocalisationOptions(Options):
    layer: str = "default"
    """The layer whose token positions are compared (``cka`` layer syntax, one layer): ``default`` = the final block."""
    minibatch: int | None = Field(None, ge=4)
    """Images per CKA minibatch n (fixed; the last partial batch is dropped). Unset = --batch-size."""
    pool: int = Field(1, ge=1)
    """Minibatches per forward pass and per chunk record (pool * n images at once: fewer, larger records)."""
    gram_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the gram GEMMs (after per-batch offset removal); U-centring and sums are float64."""
    layout: Literal["auto", "NCHW", "NHWC"] = "auto"
    """Axis order of a 4-d layer output; auto = NHWC when the model's ``output_fmt`` says so (Swin), else NCHW."""


# -- the metric ---------------------------------------------------------------------------------------------
class SpatialLocalisation(Metric):
    """How well each output token's representation matches its own input patch (minibatch linear CKA).

    value: the localisation score, the fraction of token positions whose most similar input patch
    (largest CKA) is the patch at its own position (chance: 1 / Q). values: ``cka`` (P x Q: row p =
    token position p, column q = input patch q, both row-major over ``grid``), ``peaks``, ``score``,
    ``mean_distance_cells`` / ``mean_distance_px`` (token position to its peak), ``own_cka`` (mean CKA
    with the own patch), ``peak_cka``, ``chance``, ``layer``, ``grid``, ``cell_px``, ``prefix_tokens``,
    ``minibatch``, ``batches``, ``images_used``, ``images_dropped``, ``undefined``, ``note``.
    stderr: jackknife over chunks (leave one chunk of images out) of the score; null with one chunk.
    """

    id: ClassVar[str] = "spatial_localisation"
    version: ClassVar[str] = "1"
    higher_is_better: ClassVar[bool | None] = True
    citation: ClassVar[str] = CITATION
    Options = SpatialLocalisationOptions

    def __init__(self, options: SpatialLocalisationOptions | None = None):
        super().__init__(options)
        self._layer: str | None = None

    @classmethod
    def default_layers(cls, module: torch.nn.Module) -> list[str]:
        """The layer ``-o metric.layer=default`` selects (for ``harness list layers``)."""
        return final_layer(module)

    def _n(self, requested: int) -> int:
        return int(self.options.minibatch or requested)

    def images_per_batch(self, requested: int) -> int:
        return self._n(requested) * self.options.pool

    def _resolve(self, model) -> str:
        if self._layer is None:
            found = resolve_layers(model, [self.options.layer], defaults=final_layer)
            if len(found) != 1:
                shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
                raise HarnessError(
                    f"spatial_localisation compares one layer, but {self.options.layer!r} selects {len(found)} "
                    f"of {model.id} ({shown}); give one module name"
                )
            self._layer = found[0]
        return self._layer

    def _channels_last(self, model) -> bool:
        if self.options.layout != "auto":
            return self.options.layout == "NHWC"
        return str(getattr(unwrap(model), "output_fmt", "NCHW")) == "NHWC"

    def _grams(self, model, inputs: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, Any]:
        """(geometry, token grams (P, c, c), patch grams (Q, c, c), model output) for one chunk of inputs."""
        layer = self._resolve(model)
        c = inputs.shape[0]
        input_hw = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        dtype = torch.float64 if self.options.gram_dtype == "float64" else torch.float32
        where = f"layer {layer!r} of {model.id}"
        prefix = prefix_tokens(model)
        geometry = patch_grid(model)
        found: dict[str, Any] = {}

        def on_activation(_: int, t: torch.Tensor) -> None:
            if t.dim() == 0 or t.shape[0] != c:
                raise HarnessError(
                    f"{where} has leading size {tuple(t.shape)[:1]}, not the batch size {c}; "
                    "choose a layer whose output is per image"
                )
            with no_autocast(t.device):
                tokens, grid = to_positions(t, prefix if t.dim() == 3 else 0, self._channels_last(model),
                                            geometry[0] if geometry else None, input_hw, where)
                found["grid"], found["grams"] = grid, position_grams(tokens, dtype)
                found["prefix"] = prefix if t.dim() == 3 else 0

        hooks = LayerHooks(unwrap(model), [layer], on_activation)
        with torch.inference_mode(), hooks:
            output = unwrap(model)(inputs)
        hooks.check_once()
        cell = cell_size(found["grid"], input_hw, where)
        with torch.inference_mode(), no_autocast(inputs.device):
            patch = position_grams(patchify(inputs.float(), cell), dtype)
        info = {"layer": layer, "grid": list(found["grid"]), "cell_px": list(cell), "prefix_tokens": found["prefix"]}
        return info, found["grams"], patch, output

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        model = ctx.model
        n = self._n(ctx.batch_size)
        c = len(batch)
        nb, size, batches_here = minibatch_plan(n, c)
        prediction: list[Any] = [None] * c
        chunk: dict[str, Any] | None = None
        if batches_here:
            info, tokens, patches, output = self._grams(model, batch.inputs(model))
            if isinstance(output, torch.Tensor) and output.dim() == 2:
                prediction = output.argmax(1).tolist()
            batches = torch.arange(batches_here * size).view(batches_here, size)
            u_tok = centred_batches(tokens.cpu(), batches)  # (P, nb * n * n)
            u_pat = centred_batches(patches.cpu(), batches)  # (Q, nb * n * n)
            scale = 1.0 / (size * (size - 3))
            chunk = {
                **info,
                "batches": batches_here,
                "n": size,
                "partial": not nb,
                "hsic_tokens": ((u_tok * u_tok).sum(1) * scale).tolist(),
                "hsic_patches": ((u_pat * u_pat).sum(1) * scale).tolist(),
                "hsic_cross": ((u_tok @ u_pat.T) * scale).tolist(),  # one GEMM: all batches, all (p, q)
            }
        return chunk_records(chunk, prediction, n, nb)

    # -- summary ------------------------------------------------------------------------------------------
    @staticmethod
    def _sums(chunks: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-chunk HSIC sums stacked: tokens (k, P), patches (k, Q), cross (k, P, Q), float64."""
        def stack(key: str) -> torch.Tensor:
            return torch.tensor([ch[key] for ch in chunks], dtype=torch.float64)

        return stack("hsic_tokens"), stack("hsic_patches"), stack("hsic_cross")

    def summarize(self, records, ctx) -> Summary:
        chunks, n, note = collect_chunks(records, self.id, self.id,
                                         lambda ch: (ch["layer"], ch["grid"], ch["cell_px"], ch["prefix_tokens"]))
        head = chunks[0]
        grid, cell = (head["grid"][0], head["grid"][1]), (head["cell_px"][0], head["cell_px"][1])
        tok, pat, cross = self._sums(chunks)
        cka = cka_matrix(cross.sum(0), tok.sum(0), pat.sum(0))
        found = localisation(cka, grid, cell)
        stderr = _jackknife([
            localisation(cka_matrix(cross.sum(0) - cross[k], tok.sum(0) - tok[k], pat.sum(0) - pat[k]), grid, cell)["score"]
            for k in range(len(chunks))
        ]) if len(chunks) >= 2 else None
        undefined = [
            {"kind": kind, "position": i, "reason": f"self-HSIC sum {v:.3g} <= 0 (constant or degenerate across images): CKA undefined"}
            for kind, sums in (("token", tok.sum(0)), ("patch", pat.sum(0)))
            for i, v in enumerate(sums.tolist()) if not v > 0
        ]
        used = sum(ch["batches"] * ch["n"] for ch in chunks)
        values: dict[str, Any] = {
            "layer": head["layer"],
            "grid": list(grid),
            "cell_px": list(cell),
            "prefix_tokens": head["prefix_tokens"],
            **found,
            "chance": 1.0 / (grid[0] * grid[1]),
            "cka": cka.tolist(),
            "minibatch": chunks[0]["n"] if note else n,
            "batches": sum(ch["batches"] for ch in chunks),
            "images_used": used,
            "images_dropped": len(records) - used,
            "undefined": undefined,
            "note": note,
            "comparison": (
                "linear CKA across images between each output token (prefix tokens dropped) and each input patch "
                "of the preprocessed input cut into the token grid; minibatch unbiased HSIC_1, ratio of sums"
            ),
        }
        path, relative = ctx.artifact("spatial_localisation.png")
        draw_maps(path, values, title=_title(ctx.model.id, ctx.model.random_init))
        return Summary(value=found["score"], stderr=stderr, values=values, artifacts={"spatial_localisation": relative})

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        from harness.plotting import artifact_path

        model = result.models[0]
        path, relative = artifact_path(out_dir, result.run_id, "spatial_localisation.png")
        draw_maps(path, result.values, title=_title(model.id, model.random_init))
        return {"spatial_localisation": relative}


def _jackknife(thetas: list[float]) -> float | None:
    """Jackknife standard error from leave-one-out estimates (non-finite ones ignored)."""
    t = torch.tensor([x for x in thetas if math.isfinite(x)], dtype=torch.float64)
    k = t.numel()
    return float(math.sqrt((k - 1) / k * float(((t - t.mean()) ** 2).sum()))) if k >= 2 else None


def _title(model_id: str, random_init: bool) -> str:
    return f"{model_id}{' (random init)' if random_init else ''}"


def shown_positions(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Corners, edge midpoints and the centre of a grid (row, col), deduplicated, row-major."""
    gh, gw = grid
    rows = sorted({0, (gh - 1) // 2, gh - 1})
    cols = sorted({0, (gw - 1) // 2, gw - 1})
    return [(r, c) for r in rows for c in cols]


def draw_maps(path: Path, values: dict[str, Any], *, title: str) -> None:
    """Raghu et al. Fig. 9: CKA of a few token positions with every input patch, own position outlined."""
    import numpy as np
    from matplotlib.patches import Rectangle

    from harness.plotting import pyplot

    plt = pyplot()
    gh, gw = values["grid"]
    matrix = np.array([[np.nan if v is None else v for v in row] for row in values["cka"]], dtype=float)
    positions = shown_positions((gh, gw))
    rows = len({r for r, _ in positions})
    cols = len({c for _, c in positions})
    shown = matrix[[r * gw + c for r, c in positions]]
    vmax = float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 0.8, 2.3 * rows + 0.8), dpi=110, squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#bbbbbb")
    image = None
    peaks = values.get("peaks") or []
    for ax, (r, c), row in zip(axes.flat, positions, shown):
        image = ax.imshow(np.ma.masked_invalid(row.reshape(gh, gw)), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        peak = peaks[r * gw + c] if r * gw + c < len(peaks) else None
        if peak is not None and peak != r * gw + c:
            ax.plot(peak % gw, peak // gw, marker="x", color="white", markersize=7, markeredgewidth=2)
        ax.set_title(f"token ({r}, {c})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731  (null in a result file = undefined)
    detail = f"score {fmt(values.get('score'))}, mean peak distance {fmt(values.get('mean_distance_cells'))} cells"
    fig.suptitle(f"CKA(token, input patch): {title}, {values.get('layer')}\n{detail}"
                 " (red: own position, x: peak)", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.04)
    fig.savefig(path)
    plt.close(fig)


@harness.hookimpl
def register_metrics(register):
    register(SpatialLocalisation)
