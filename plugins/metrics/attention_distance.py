"""Mean attention distance per layer and head (Dosovitskiy et al. 2021, Fig. 7; Raghu et al. 2021, Fig. 3).

For layer l, head h and image x: ``MAD = (1/N) sum_i sum_j A_ij d_ij`` over the N patch queries i and
patch keys j, where ``A`` is the post-softmax attention with the prefix tokens (CLS, distillation,
registers: timm ``num_prefix_tokens``) dropped and each query row renormalised over the patch keys,
and ``d_ij`` is the Euclidean distance between the grid positions of i and j times the patch size in
input pixels. The attention mass the patch queries put on prefix tokens is reported separately
(``prefix_mass``). A patch query whose attention on the patch keys is exactly zero (all its mass on
prefix tokens, as float32 softmax gives when the prefix logits dominate) has no distance: it is left
out, not counted as distance 0, and counted in ``excluded_rows``. Across images every remaining patch
query weighs the same: a head's value is the mean over all kept (image, query) rows, which is the
average of the per-image values when no row is left out. Each record carries its per-image mean and
left-out count per head, so the summary is the same after ``--resume`` or a torchrun merge.

Swin (windowed attention), documented convention: distances are measured *within each window*
between the window-local grid positions of query and key, in input pixels (the stage's token stride,
4 * 2^stage for swin_*_patch4, times the grid distance); every window and every query weighs the
same. In shifted windows, token pairs from different image regions are masked (probability ~e^-100),
so every pair with real weight is measured at its true image distance. Swin distances are bounded by
the window (7 x 7 tokens) and are not comparable with a global-attention ViT's.

timm computes fused attention by default (no probability matrix exists): ``fused_attn`` is switched
off on the analysed model's attention modules only, for the duration of ``evaluate``, and the
probabilities are read from a hook on each module's ``attn_drop`` (identity at eval). Each batch is
reduced to (layers, heads) inside the hook.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator, cast

import torch
from torch import nn

import harness
from harness.components import Metric, Summary
from harness.errors import HarnessError
from harness.stats import mean_stderr

from .layers import is_windowed, no_autocast, patch_grid, prefix_tokens

CITATION = (
    "Dosovitskiy et al. An Image is Worth 16x16 Words. ICLR 2021; Raghu, Unterthiner, Kornblith, Zhang, "
    "Dosovitskiy. Do Vision Transformers See Like Convolutional Neural Networks? NeurIPS 2021"
)


def grid_distances(grid_h: int, grid_w: int, stride_h: float, stride_w: float) -> torch.Tensor:
    """(N, N) Euclidean distances in pixels between the cells of a grid_h x grid_w grid (row-major)."""
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    pos = torch.stack([ys.flatten() * stride_h, xs.flatten() * stride_w], 1)
    return torch.cdist(pos, pos)


def distance_sums(attn: torch.Tensor, distances: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (batch, head) from (B, H, T, T): the sum of the patch queries' attention distances, the
    number of patch queries left out, and the mean prefix mass of the patch queries.

    Prefix rows and columns are dropped and each patch-query row is renormalised over patch keys; a
    row whose patch attention is exactly zero (all mass on prefix tokens) has no distance and is left
    out of the sum and counted instead.
    """
    a = attn.to(torch.float64)
    patch = a[..., prefix:, prefix:]
    mass = patch.sum(-1)  # (B, H, N); exactly 0 only when every patch entry of the row is 0
    empty = mass == 0
    weighted = torch.einsum("bhij,ij->bhi", patch, distances.to(a.device))
    row = torch.where(empty, torch.zeros_like(mass), weighted / mass.masked_fill(empty, 1.0))
    prefix_mass = a[..., prefix:, :prefix].sum(-1).mean(-1) if prefix else torch.zeros_like(mass[..., 0])
    return row.sum(-1), empty.sum(-1), prefix_mass


def pooled_mean(means: list[float | None], kept: list[int]) -> float | None:
    """The mean over all kept rows from per-image means and kept-row counts (None when none is kept)."""
    total = sum(k for m, k in zip(means, kept) if m is not None)
    if total == 0:
        return None
    return sum(m * k for m, k in zip(means, kept) if m is not None and k) / total


def attention_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm self-attention modules: a ``num_heads`` attribute and an ``attn_drop`` child (post-softmax)."""
    found = []
    for name, module in root.named_modules():
        if hasattr(module, "num_heads") and isinstance(getattr(module, "attn_drop", None), nn.Module):
            found.append((name, module))
    return found


@contextmanager
def unfused(modules: list[nn.Module]) -> Iterator[None]:
    """Switch off fused attention on ``modules`` only, restoring each flag afterwards."""
    saved = [(m, m.__dict__.get("fused_attn", None), hasattr(m, "fused_attn")) for m in modules]
    try:
        for m in modules:
            if hasattr(m, "fused_attn"):
                cast(Any, m).fused_attn = False
        yield
    finally:
        for m, value, had in saved:
            if not had:
                continue
            if value is None:
                m.__dict__.pop("fused_attn", None)  # it was a class attribute
            else:
                m.fused_attn = value


class AttentionDistance(Metric):
    """Mean attention distance (px) per layer and head of timm ViT/DeiT/Swin models; prefix mass separately.

    value: the mean over all layers and heads (px), averaged over images; stderr over images.
    values: ``mad`` (layers x heads), ``mad_sorted`` (heads sorted per layer), ``layer_mean``,
    ``first_layer_mean``, ``last_layer_mean``, ``prefix_mass`` (layers x heads, share of attention
    patch queries give to CLS/distillation/register tokens; null without prefix tokens), ``layers``,
    ``windowed`` (per layer), ``convention``, ``excluded_rows`` (layers x heads, over all images:
    patch queries left out because all their attention was on prefix tokens) and
    ``excluded_rows_total``. A head whose every query was left out has null ``mad``.
    """

    id: ClassVar[str] = "attention_distance"
    version: ClassVar[str] = "2"  # 2: queries with no attention on patch tokens are left out, not distance 0
    higher_is_better: ClassVar[bool | None] = None
    citation: ClassVar[str] = CITATION

    def _geometry(self, model, name: str, module: nn.Module, tokens: int, input_hw: tuple[int, int]) -> tuple[torch.Tensor, int, bool]:
        """(distances (N, N) px, prefix tokens, windowed) for one attention module given its token count."""
        root = model.module
        window = getattr(module, "window_size", None) if is_windowed(module) else None
        if window is not None:  # Swin: window-local grid; stride from the block's input resolution
            wh, ww = (window, window) if isinstance(window, int) else (int(window[0]), int(window[1]))
            parent = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
            res = getattr(parent, "input_resolution", None) or getattr(parent, "grid_size", None)
            if res is None:
                raise HarnessError(f"{model.id}: cannot find the token resolution of windowed attention {name!r}")
            rh, rw = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
            if tokens != wh * ww:
                raise HarnessError(f"{model.id}: attention {name!r} has {tokens} tokens per window, expected {wh}x{ww}")
            return grid_distances(wh, ww, input_hw[0] / rh, input_hw[1] / rw), 0, True
        prefix = prefix_tokens(model)
        geometry = patch_grid(model)
        n_patch = tokens - prefix
        ph: float  # patch stride in pixels
        pw: float
        if geometry is not None and geometry[0][0] * geometry[0][1] == n_patch:
            (gh, gw), (ph, pw) = geometry
        else:
            side = int(round(math.sqrt(n_patch)))
            if side * side != n_patch:
                raise HarnessError(f"{model.id}: cannot place the {n_patch} patch tokens of {name!r} on a grid")
            gh = gw = side
            ph, pw = input_hw[0] / gh, input_hw[1] / gw
        return grid_distances(gh, gw, ph, pw), prefix, False

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        model = ctx.model
        root = model.module
        modules = attention_modules(root)
        if not modules:
            raise HarnessError(
                f"attention_distance needs a model with self-attention (timm ViT, DeiT, Swin); {model.id} has none"
            )
        inputs = batch.inputs(model)
        b = inputs.shape[0]
        input_hw = (inputs.shape[-2], inputs.shape[-1])
        geometry: dict[int, tuple[torch.Tensor, int, bool]] = {}
        results: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        queries: dict[int, int] = {}  # patch queries per image and layer (all windows of a windowed layer)

        def hook(index: int, name: str, module: nn.Module):
            def on_probs(_m, _args, probs: torch.Tensor) -> None:
                if index in results:
                    raise HarnessError(f"{model.id}: attention {name!r} ran twice in one forward pass")
                if index not in geometry:
                    geometry[index] = self._geometry(model, name, module, probs.shape[-1], input_hw)
                distances, prefix, windowed = geometry[index]
                with no_autocast(probs.device):
                    total, left_out, mass = distance_sums(probs, distances, prefix)
                windows = probs.shape[0] // b if windowed else 1
                if windowed:  # (B * windows, H) -> each image's windows together
                    total = total.reshape(b, -1, total.shape[-1]).sum(1)
                    left_out = left_out.reshape(b, -1, left_out.shape[-1]).sum(1)
                    mass = mass.reshape(b, -1, mass.shape[-1]).mean(1)
                queries[index] = windows * (probs.shape[-1] - prefix)
                kept = queries[index] - left_out
                mad = torch.where(kept > 0, total / kept.clamp_min(1), torch.full_like(total, float("nan")))
                results[index] = (mad.cpu(), left_out.cpu(), mass.cpu())
            return on_probs

        handles = [cast(nn.Module, m.attn_drop).register_forward_hook(hook(i, name, m)) for i, (name, m) in enumerate(modules)]
        try:
            with unfused([m for _, m in modules]), torch.inference_mode():
                output = root(inputs)
        finally:
            for h in handles:
                h.remove()
        missing = [name for i, (name, _) in enumerate(modules) if i not in results]
        if missing:
            raise HarnessError(
                f"{model.id}: no attention probabilities observed in {missing[0]!r} (an attention implementation "
                "without an explicit softmax path); attention_distance supports timm ViT, DeiT and Swin"
            )
        prediction = output.argmax(1).tolist() if isinstance(output, torch.Tensor) and output.dim() == 2 else [None] * b
        names = [name for name, _ in modules]
        records = []
        for k in range(b):
            values: dict[str, Any] = {
                # per head: the mean over this image's kept patch queries (null when every one was left out)
                "mad": [[None if math.isnan(v) else v for v in results[i][0][k].tolist()] for i in range(len(modules))],
                "excluded_rows": [results[i][1][k].tolist() for i in range(len(modules))],
                "prefix_mass": [results[i][2][k].tolist() for i in range(len(modules))] if prefix_tokens(model) else None,
            }
            if k == 0:
                values["layers"] = names
                values["windowed"] = [geometry[i][2] for i in range(len(modules))]
                values["prefix_tokens"] = prefix_tokens(model)
                values["queries"] = [queries[i] for i in range(len(modules))]
            records.append({"prediction": prediction[k], "values": values})
        return records

    def summarize(self, records, ctx) -> Summary:
        head = next(r["values"] for r in records if "layers" in r["values"])
        layers, windowed = head["layers"], head["windowed"]
        queries = head["queries"]
        heads = [len(row) for row in records[0]["values"]["mad"]]
        mad: list[list[float | None]] = []
        excluded: list[list[int]] = []
        for l in range(len(layers)):
            mad.append([])
            excluded.append([])
            for h in range(heads[l]):
                means = [r["values"]["mad"][l][h] for r in records]
                left_out = [int(r["values"]["excluded_rows"][l][h]) for r in records]
                mad[l].append(pooled_mean(means, [queries[l] - e for e in left_out]))
                excluded[l].append(sum(left_out))
        defined = [v for row in mad for v in row if v is not None]
        if not defined:
            raise HarnessError(
                "attention_distance: every patch query of every image put all its attention on prefix tokens "
                "(no attention distance is defined)"
            )
        value = sum(defined) / len(defined)
        overall = []  # per image: the mean over its heads (heads whose every query was left out are skipped)
        for r in records:
            kept = [v for row in r["values"]["mad"] for v in row if v is not None]
            if kept:
                overall.append(sum(kept) / len(kept))
        _, stderr = mean_stderr(overall)
        prefix = None
        if records[0]["values"].get("prefix_mass") is not None:
            prefix = [
                torch.tensor([r["values"]["prefix_mass"][l] for r in records], dtype=torch.float64).mean(0).tolist()
                for l in range(len(layers))
            ]
        layer_mean = [sum(k) / len(k) if k else None for k in ([v for v in row if v is not None] for row in mad)]
        values = {
            "layers": layers,
            "mad": mad,
            "mad_sorted": [sorted(v for v in row if v is not None) for row in mad],
            "layer_mean": layer_mean,
            "first_layer_mean": layer_mean[0],
            "last_layer_mean": layer_mean[-1],
            "prefix_mass": prefix,
            "prefix_tokens": head.get("prefix_tokens", 0),
            "excluded_rows": excluded,
            "excluded_rows_total": sum(map(sum, excluded)),
            "windowed": windowed,
            "unit": "px",
            "convention": (
                "windowed (Swin) layers: distance within each window between window-local grid positions, in input px"
                if any(windowed) else "global attention over patch tokens; prefix tokens dropped, rows renormalised"
            ),
        }
        path, relative = ctx.artifact("attention_distance.png")
        draw_distances(path, values, title=_title(ctx.model.id, ctx.model.random_init, len(records)))
        return Summary(value=value, stderr=stderr, values=values, artifacts={"attention_distance": relative})

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        model = result.models[0]
        from harness.plotting import artifact_path

        path, relative = artifact_path(out_dir, result.run_id, "attention_distance.png")
        draw_distances(path, result.values, title=_title(model.id, model.random_init, result.dataset.n_samples))
        return {"attention_distance": relative}


def _title(model_id: str, random_init: bool, n: int) -> str:
    return f"Mean attention distance: {model_id}{' (random init)' if random_init else ''}, {n} images"


def draw_distances(path: Path, values: dict[str, Any], *, title: str) -> None:
    """Raghu et al. Fig. 3: one dot per head (sorted within each layer), layers on the x axis."""
    from harness.plotting import pyplot

    plt = pyplot()
    rows = values["mad_sorted"]
    n_layers = len(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * n_layers + 2), 4), dpi=120)
    most = max(len(r) for r in rows)
    cmap = plt.get_cmap("viridis")
    for layer, heads in enumerate(rows):
        for rank, v in enumerate(heads):
            ax.scatter(layer + 1, v, s=14, color=cmap(rank / max(1, most - 1)), zorder=3,
                       label=f"head {rank + 1} (sorted)" if layer == 0 and most <= 16 else None)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (px)")
    ax.set_xticks(range(1, n_layers + 1), [str(i) for i in range(1, n_layers + 1)] if n_layers <= 30 else
                  [str(i) if i % 2 else "" for i in range(1, n_layers + 1)], fontsize=7)
    if any(values.get("windowed") or []):
        ax.set_title(title + "\n(windowed attention: distances within each window)", fontsize=9)
    else:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if most <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@harness.hookimpl
def register_metrics(register):
    register(AttentionDistance)
