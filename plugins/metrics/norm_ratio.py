"""Skip-connection norm ratio ||z|| / ||f(z)|| per residual branch (Raghu et al. 2021, Fig. 7).

For each residual branch ``x_out = z + f(z)``: ``z`` is the representation carried by the skip
connection and ``f(z)`` the branch output added to it. Per token (a ViT token, or a CNN spatial
position, the vector over channels) the ratio ``||z_t|| / ||f(z)_t||`` is taken, then averaged over the
tokens of a group (prefix tokens: CLS / distillation / registers; patch tokens: everything else) and
over images. A high ratio means the skip connection dominates the block's output.

Branches per family:

- transformer blocks (timm ViT / DeiT / Swin): two per block: ``attn`` (z = the block input,
  f = ``drop_path1`` output, i.e. attention after layer scale) and ``mlp`` (z = the ``norm2`` input,
  i.e. the residual after attention, f = ``drop_path2`` output);
- ResNet blocks: z = the ``downsample`` output (or the block input), f = the last op before the
  residual add (``drop_path``, ``se`` or the last BN);
- ConvNeXt blocks: z = the ``shortcut`` output, f = the ``drop_path`` output (after ``gamma``).

A branch whose output has zero norm (e.g. a random-init timm ResNet, whose last BN of every block is
zero-initialised) has an undefined ratio: reported as null with the reason, never clamped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

import harness
from harness.components import Metric, Summary
from harness.errors import HarnessError
from harness.stats import mean_stderr

from .layers import LayerHooks, cnn_blocks, no_autocast, prefix_tokens, short_label, transformer_blocks


def residual_branches(root: nn.Module) -> list[tuple[str, str, str, bool]]:
    """(branch name, z layer, f layer, channels_last) for each residual branch the model has."""
    out: list[tuple[str, str, str, bool]] = []
    for block in transformer_blocks(root):
        module = root.get_submodule(block)
        children = dict(module.named_children())
        if "drop_path1" not in children or "drop_path2" not in children:
            continue
        out.append((f"{block}.attn", f"{block}:in", f"{block}.drop_path1", True))
        out.append((f"{block}.mlp", f"{block}.norm2:in", f"{block}.drop_path2", True))
    if out:
        return out
    for block in cnn_blocks(root):
        module = root.get_submodule(block)
        children = dict(module.named_children())
        if "conv_dw" in children and "shortcut" in children and "drop_path" in children:  # ConvNeXt
            out.append((block, f"{block}.shortcut", f"{block}.drop_path", False))
            continue
        branch = next((c for c in ("drop_path", "se", "bn3", "bn2") if isinstance(children.get(c), nn.Module)), None)
        if branch is None or "conv1" not in children:
            continue
        z = f"{block}.downsample" if isinstance(children.get("downsample"), nn.Module) else f"{block}:in"
        out.append((block, z, f"{block}.{branch}", False))
    return out


def token_norms(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, tokens) L2 norms over channels of (B, ..., C) (channels_last) or (B, C, ...)."""
    x = t.detach().float()
    if not channels_last:
        x = x.movedim(1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1]).norm(dim=-1)


class NormRatio(Metric):
    """Skip-connection norm ratio ||z|| / ||f(z)|| per residual branch, prefix vs patch tokens.

    value: the mean over branches of the patch-token ratio (branches with an undefined ratio left out),
    averaged over images; stderr over images. values: ``branches``, ``patch`` and ``prefix`` (per branch,
    null = undefined or no prefix tokens), ``per_token`` (branches x tokens, token models only),
    ``undefined`` (reasons).
    """

    id: ClassVar[str] = "norm_ratio"
    version: ClassVar[str] = "1"
    higher_is_better: ClassVar[bool | None] = None
    citation: ClassVar[str] = (
        "Raghu, Unterthiner, Kornblith, Zhang, Dosovitskiy. Do Vision Transformers See Like Convolutional "
        "Neural Networks? NeurIPS 2021 (Sec. 6, Fig. 7)"
    )

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        model = ctx.model
        root = model.module
        branches = residual_branches(root)
        if not branches:
            raise HarnessError(
                f"norm_ratio found no residual branches in {model.id} (supported: timm ViT/DeiT/Swin blocks, "
                "ResNet and ConvNeXt blocks)"
            )
        layers = [spec for _, z, f, _ in branches for spec in (z, f)]
        channels_last = [cl for *_, cl in branches for _ in (0, 1)]
        norms: list[torch.Tensor | None] = [None] * len(layers)

        def on_activation(i: int, t: torch.Tensor) -> None:
            with no_autocast(t.device):
                norms[i] = token_norms(t, channels_last[i]).cpu()  # before any in-place residual add

        inputs = batch.inputs(model)
        hooks = LayerHooks(root, layers, on_activation)
        with torch.inference_mode(), hooks:
            output = root(inputs)
        hooks.check_once()
        prefix = prefix_tokens(model) if transformer_blocks(root) else 0
        b = inputs.shape[0]
        ratios = []  # per branch: (B, tokens)
        for k in range(len(branches)):
            z, f = norms[2 * k], norms[2 * k + 1]
            assert z is not None and f is not None  # check_once: every hooked layer ran
            if z.shape != f.shape:
                raise HarnessError(f"{model.id}: skip and branch of {branches[k][0]!r} differ in shape {tuple(z.shape)} vs {tuple(f.shape)}")
            ratios.append(z / f)  # inf where the branch output is zero
        patch = torch.stack([r[:, prefix:].mean(1) for r in ratios], 1)  # (B, L)
        pre = torch.stack([r[:, :prefix].mean(1) for r in ratios], 1) if prefix else None
        tokens = {r.shape[1] for r in ratios}
        per_token = None
        if prefix and len(tokens) == 1:
            per_token = torch.stack([r.sum(0) for r in ratios]).tolist()  # (L, T) summed over the batch
        prediction = output.argmax(1).tolist() if isinstance(output, torch.Tensor) and output.dim() == 2 else [None] * b
        records = []
        for i in range(b):
            values: dict[str, Any] = {"patch": patch[i].tolist(), "prefix": pre[i].tolist() if pre is not None else None}
            if i == 0:
                values["branches"] = [name for name, *_ in branches]
                values["prefix_tokens"] = prefix
                values["per_token_sum"] = per_token
                values["batch"] = b
            records.append({"prediction": prediction[i], "values": values})
        return records

    def summarize(self, records, ctx) -> Summary:
        head = next(r["values"] for r in records if "branches" in r["values"])
        names = head["branches"]

        def column(key: str) -> list[float | None]:
            out = []
            for k in range(len(names)):
                xs = [r["values"][key][k] for r in records]
                good = [x for x in xs if x is not None and math.isfinite(x)]
                out.append(sum(good) / len(good) if len(good) == len(xs) else None)
            return out

        patch = column("patch")
        prefix = column("prefix") if records[0]["values"].get("prefix") is not None else None
        undefined = [
            {"branch": n, "reason": "the branch output f(z) has zero norm at some token (e.g. zero-initialised last BN of a random-init ResNet): ratio undefined"}
            for n, v in zip(names, patch) if v is None
        ]
        good = [k for k, v in enumerate(patch) if v is not None]
        per_image = [sum(r["values"]["patch"][k] for k in good) / len(good) for r in records] if good else []
        value, stderr = mean_stderr(per_image) if per_image else (math.nan, None)
        per_token = None
        sums = [r["values"]["per_token_sum"] for r in records if r["values"].get("per_token_sum") is not None]
        if sums:
            nan = float("nan")  # an infinite ratio (zero branch output) comes back from the samples file as null
            total = sum(torch.tensor([[nan if v is None else v for v in row] for row in s], dtype=torch.float64) for s in sums)
            count = sum(r["values"]["batch"] for r in records if r["values"].get("per_token_sum") is not None)
            t = total / count
            per_token = [[v if math.isfinite(v) else None for v in row] for row in t.tolist()]
        values = {
            "branches": names,
            "patch": patch,
            "prefix": prefix,
            "prefix_tokens": head.get("prefix_tokens", 0),
            "per_token": per_token,
            "undefined": undefined,
        }
        path, relative = ctx.artifact("norm_ratio.png")
        draw_norm_ratio(path, values, title=_title(ctx.model.id, ctx.model.random_init, len(records)))
        return Summary(value=value, stderr=stderr, values=values, artifacts={"norm_ratio": relative})

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        model = result.models[0]
        from harness.plotting import artifact_path

        path, relative = artifact_path(out_dir, result.run_id, "norm_ratio.png")
        draw_norm_ratio(path, result.values, title=_title(model.id, model.random_init, result.dataset.n_samples))
        return {"norm_ratio": relative}


def _title(model_id: str, random_init: bool, n: int) -> str:
    return f"Norm ratio ||z|| / ||f(z)||: {model_id}{' (random init)' if random_init else ''}, {n} images"


def draw_norm_ratio(path: Path, values: dict[str, Any], *, title: str) -> None:
    """Fig. 7 of Raghu et al.: per-token heatmap (token models) and the ratio per branch, prefix vs patch."""
    import numpy as np

    from harness.plotting import pyplot

    plt = pyplot()
    names = values["branches"]
    per_token = values.get("per_token")
    panels = 2 if per_token else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), dpi=120, squeeze=False)
    if per_token:
        ax = axes[0, 0]
        m = np.array([[np.nan if v is None else v for v in row] for row in per_token], dtype=float)
        im = ax.imshow(np.log10(m), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("token (0 = first prefix token)")
        ax.set_ylabel("residual branch")
        step = max(1, len(names) // 24)
        ax.set_yticks(range(0, len(names), step), [short_label(names[i]) for i in range(0, len(names), step)], fontsize=6)
        fig.colorbar(im, ax=ax, label="log10 ratio")
    ax = axes[0, -1]
    xs = list(range(len(names)))
    to_np = lambda vs: np.array([np.nan if v is None else v for v in vs], dtype=float)  # noqa: E731
    ax.plot(xs, to_np(values["patch"]), marker="o", ms=3, label="patch / spatial tokens")
    if values.get("prefix"):
        ax.plot(xs, to_np(values["prefix"]), marker="s", ms=3, label="prefix tokens (CLS ...)")
    ax.set_yscale("log")
    step = max(1, len(names) // 24)
    ax.set_xticks(range(0, len(names), step), [short_label(names[i]) for i in range(0, len(names), step)], rotation=90, fontsize=6)
    ax.set_ylabel("||z|| / ||f(z)||")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@harness.hookimpl
def register_metrics(register):
    register(NormRatio)
