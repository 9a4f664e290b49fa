"""Token grouping under noise: the spectrum of each block's token affinity (FAN, ICML 2022, section 3).

For every block (auto: ``blocks.N`` of ViT/DeiT/FAN; ``stages.S.blocks.B`` of ConvNeXt;
``layers.S.blocks.B`` of Swin; ``layerS.B`` of ResNets; or ``-o layers=[...]``) and every image,
the block's output tokens ``z_i`` (prefix tokens such as CLS dropped; CNN maps flattened, larger
than ``max_tokens`` average-pooled to a square grid first) give the cosine affinity
``S_ij = max(0, cos(z_i, z_j))`` and its eigenvalues ``l_1 >= l_2 >= ...``. By the spectral-
clustering argument of the paper, the number of significant eigenvalues estimates the number of
token groups. The same is done for the image with Gaussian noise added (``x + N(0, noise_std^2)`` in
[0, 1] pixel space, clipped; seeded per image).

Per block, averaged over images (``values``): ``significant_clean`` / ``significant_noisy`` (count
of ``l_k >= threshold * l_1``; the paper gives no threshold, the default is 1%),
``effective_rank_clean`` / ``_noisy`` (``exp`` of the entropy of the normalised eigenvalues, a
threshold-free count), ``noise_ratio`` (``||z(x + n) - z(x)|| / ||z(x)||``, the paper's perturbation
norm ratio), ``spectrum_clean`` / ``_noisy`` (the first ``keep`` eigenvalues divided by ``l_1``).
Headline: the mean over images and blocks of the relative change of the significant-eigenvalue
count under noise, ``(n_noisy - n_clean) / n_clean`` (no better direction: an analysis). A PNG of
the per-block counts and spectra is written with the result.
"""

from __future__ import annotations

import math
from collections.abc import Sized
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from pydantic import Field

import harness
from harness.components import Metric, Options, Summary
from harness.errors import HarnessError
from harness.stats import mean_stderr


class TokenSpectrumOptions(Options):
    noise_std: float = Field(0.1, ge=0)
    """Standard deviation of the Gaussian input noise, in [0, 1] pixel space."""
    threshold: float = Field(0.01, gt=0, lt=1)
    """An eigenvalue is significant when at least this fraction of the largest."""
    layers: list[str] | None = None
    """Module names whose outputs are analysed; unset = every block (see the module docstring)."""
    max_tokens: int = Field(196, ge=4)
    """CNN maps with more positions are average-pooled to a floor(sqrt(max_tokens))^2 grid."""
    keep: int = Field(32, ge=1)
    """Leading eigenvalues (divided by the largest) kept per block for the spectra."""


def find_blocks(module: torch.nn.Module) -> list[str]:
    """The residual blocks of common architectures, in forward order."""
    containers = (torch.nn.Sequential, torch.nn.ModuleList)
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, containers) and len(blocks):
        return [f"blocks.{i}" for i in range(len(blocks))]
    for attr in ("stages", "layers"):
        stages = getattr(module, attr, None)
        if isinstance(stages, containers) and len(stages) and all(
            isinstance(getattr(s, "blocks", None), containers) for s in stages
        ):
            return [f"{attr}.{i}.blocks.{j}" for i, s in enumerate(stages) for j in range(len(cast(Sized, s.blocks)))]
    names = []
    for k in range(1, 5):
        stage = getattr(module, f"layer{k}", None)
        if isinstance(stage, containers):
            names += [f"layer{k}.{j}" for j in range(len(stage))]
    if names:
        return names
    raise HarnessError("token_spectrum: cannot find this model's blocks; pass -o metric.layers='[\"NAME\", ...]'")


def to_tokens(output: Any, prefix: int, max_tokens: int, channels_last: bool) -> torch.Tensor:
    """(B, N, C) tokens from a block output: (B, N, C) sequences or (B, C, H, W) / (B, H, W, C) maps."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise HarnessError(f"token_spectrum: a hooked block returned {type(output).__name__}, not a tensor")
    if output.dim() == 3:
        return output[:, prefix:]
    if output.dim() == 4:
        fmap = output.permute(0, 3, 1, 2) if channels_last else output
        height, width = fmap.shape[-2:]
        if height * width > max_tokens:
            side = max(1, math.isqrt(max_tokens))
            fmap = F.adaptive_avg_pool2d(fmap, (min(side, height), min(side, width)))
        return fmap.flatten(2).transpose(1, 2)
    raise HarnessError(f"token_spectrum: a hooked block outputs shape {tuple(output.shape)}, not tokens or a map")


def affinity_spectrum(tokens: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (B, N), descending, of the clipped cosine affinity of (B, N, C) tokens (float64)."""
    z = F.normalize(tokens.detach().double(), dim=-1, eps=1e-12)
    affinity = (z @ z.transpose(1, 2)).clamp_min(0)
    # One thread: LAPACK's multi-threaded solver on small matrices can take seconds instead of
    # milliseconds when the cores are busy (observed: 5.6 s vs 12 ms for a (2, 196, 196) batch).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(affinity).flip(-1)
    finally:
        torch.set_num_threads(threads)


def spectrum_stats(eigenvalues: torch.Tensor, threshold: float, keep: int) -> dict[str, torch.Tensor]:
    """Per row: significant count, effective rank, and the first ``keep`` eigenvalues over the largest."""
    top = eigenvalues[:, :1].clamp_min(1e-12)
    significant = (eigenvalues >= threshold * top).sum(1)
    mass = eigenvalues.clamp_min(0)
    p = mass / mass.sum(1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1)
    return {
        "significant": significant.double(),
        "effective_rank": entropy.exp(),
        "spectrum": (eigenvalues[:, :keep] / top),
    }


class TokenSpectrum(Metric):
    """Significant eigenvalues of each block's token affinity, clean vs Gaussian-noised inputs (FAN)."""

    id: ClassVar[str] = "token_spectrum"
    higher_is_better: ClassVar[bool | None] = None
    citation: ClassVar[str] = "Zhou et al., Understanding The Robustness in Vision Transformers, ICML 2022"
    Options = TokenSpectrumOptions

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        model = ctx.model
        net = model.module
        names = self.options.layers or find_blocks(net)
        modules = dict(net.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise HarnessError(f"token_spectrum: the model has no module {unknown[0]!r}")
        prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
        channels_last = getattr(net, "output_fmt", "NCHW") == "NHWC"
        inputs = batch.inputs(model)
        noisy = self._noisy(model, inputs, batch.seeds)
        n = len(inputs)
        stats: dict[str, list[list[Any]]] = {}
        predictions: list[int] = []
        step = max(1, model.batch_size // 2)
        for start in range(0, n, step):
            stop = min(n, start + step)
            size = stop - start
            per_layer: list[dict[str, Any]] = []

            def hook(_module, _inputs, output, store=per_layer, size=size):
                tokens = to_tokens(output, prefix, self.options.max_tokens, channels_last)
                clean, dirty = tokens[:size], tokens[size:]
                a = spectrum_stats(affinity_spectrum(clean), self.options.threshold, self.options.keep)
                b = spectrum_stats(affinity_spectrum(dirty), self.options.threshold, self.options.keep)
                diff = (dirty.double() - clean.double()).flatten(1).norm(dim=1)
                ratio = diff / clean.double().flatten(1).norm(dim=1).clamp_min(1e-12)
                store.append({"clean": a, "noisy": b, "ratio": ratio, "tokens": clean.shape[1]})

            handles = [modules[name].register_forward_hook(hook) for name in names]
            try:
                with torch.inference_mode():
                    logits = net(torch.cat([inputs[start:stop], noisy[start:stop]]))
            finally:
                for handle in handles:
                    handle.remove()
            if len(per_layer) != len(names):
                raise HarnessError(
                    f"token_spectrum: {len(names)} layers hooked but {len(per_layer)} outputs seen "
                    "(a layer runs more or less than once per forward pass)"
                )
            predictions += logits[:size].argmax(1).tolist()
            for i in range(size):
                for key, value in self._record(per_layer, i).items():
                    stats.setdefault(key, []).append(value)
        return [
            {"prediction": int(predictions[i]), "values": {key: stats[key][i] for key in stats} | {"layers": names}}
            for i in range(n)
        ]

    def _noisy(self, model, inputs: torch.Tensor, seeds) -> torch.Tensor:
        pixels = model.denormalise(inputs)
        noise = torch.stack([
            torch.randn(pixels.shape[1:], generator=torch.Generator().manual_seed(int(s) % 2**63)) for s in seeds
        ]).to(pixels)
        return model.normalise((pixels + self.options.noise_std * noise).clamp(0, 1))

    @staticmethod
    def _record(per_layer: list[dict[str, Any]], i: int) -> dict[str, Any]:
        def r(x: float) -> float:
            return round(float(x), 6)

        return {
            "significant_clean": [int(layer["clean"]["significant"][i]) for layer in per_layer],
            "significant_noisy": [int(layer["noisy"]["significant"][i]) for layer in per_layer],
            "effective_rank_clean": [r(layer["clean"]["effective_rank"][i]) for layer in per_layer],
            "effective_rank_noisy": [r(layer["noisy"]["effective_rank"][i]) for layer in per_layer],
            "noise_ratio": [r(layer["ratio"][i]) for layer in per_layer],
            "spectrum_clean": [[r(v) for v in layer["clean"]["spectrum"][i].tolist()] for layer in per_layer],
            "spectrum_noisy": [[r(v) for v in layer["noisy"]["spectrum"][i].tolist()] for layer in per_layer],
            "n_tokens": [int(layer["tokens"]) for layer in per_layer],
        }

    def summarize(self, records, ctx) -> Summary:
        values = [r["values"] for r in records]
        layers = values[0]["layers"]

        def mean_of(key: str) -> list[float]:
            t = torch.tensor([v[key] for v in values], dtype=torch.float64)
            return t.mean(0).tolist()

        def mean_spectrum(key: str) -> list[list[float]]:
            width = min(len(s) for v in values for s in v[key])
            t = torch.tensor([[s[:width] for s in v[key]] for v in values], dtype=torch.float64)
            return t.mean(0).tolist()

        per_image = []
        for v in values:
            clean = torch.tensor(v["significant_clean"], dtype=torch.float64)
            noisy = torch.tensor(v["significant_noisy"], dtype=torch.float64)
            per_image.append(float(((noisy - clean) / clean.clamp_min(1)).mean()))
        value, stderr = mean_stderr(per_image)
        report = {
            "layers": layers,
            "n_tokens": values[0]["n_tokens"],
            "significant_clean": mean_of("significant_clean"),
            "significant_noisy": mean_of("significant_noisy"),
            "effective_rank_clean": mean_of("effective_rank_clean"),
            "effective_rank_noisy": mean_of("effective_rank_noisy"),
            "noise_ratio": mean_of("noise_ratio"),
            "spectrum_clean": mean_spectrum("spectrum_clean"),
            "spectrum_noisy": mean_spectrum("spectrum_noisy"),
            "threshold": self.options.threshold,
            "noise_std": self.options.noise_std,
        }
        path, relative = ctx.artifact("token_spectrum.png")
        draw(path, report, f"{ctx.model.id}: token affinity spectrum (noise std {self.options.noise_std})")
        return Summary(value=value, stderr=stderr, values=report, artifacts={"token_spectrum": relative})

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        folder = Path(out_dir) / result.run_id
        folder.mkdir(parents=True, exist_ok=True)
        draw(folder / "token_spectrum.png", result.values,
             f"{result.models[0].id}: token affinity spectrum (noise std {result.values.get('noise_std')})")
        return {"token_spectrum": f"{result.run_id}/token_spectrum.png"}


def draw(path: Path, values: dict[str, Any], title: str) -> None:
    """Left: significant eigenvalues per block, clean vs noisy (and the noise norm ratio).
    Right: the mean normalised spectra of the first, middle and last block."""
    from harness.plotting import pyplot

    plt = pyplot()
    layers = values["layers"]
    xs = list(range(len(layers)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    left.plot(xs, values["significant_clean"], marker="o", label="clean")
    left.plot(xs, values["significant_noisy"], marker="s", label="noisy")
    left.set(xlabel="block", ylabel=f"eigenvalues >= {values['threshold']:g} x largest", title="significant eigenvalues")
    left.set_xticks(xs, [str(i) for i in xs], fontsize=6)
    left.grid(alpha=0.3)
    twin = left.twinx()
    twin.plot(xs, values["noise_ratio"], color="tab:green", linestyle=":", label="noise norm ratio")
    twin.set_ylabel("||z(x+n) - z(x)|| / ||z(x)||", color="tab:green", fontsize=7)
    handles = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    left.legend(handles=handles, fontsize=7)
    picks = sorted({0, len(layers) // 2, len(layers) - 1})
    for k, index in enumerate(picks):
        color = f"C{k}"
        clean, noisy = values["spectrum_clean"][index], values["spectrum_noisy"][index]
        right.semilogy(range(1, len(clean) + 1), [max(v, 1e-8) for v in clean], color=color, label=f"{layers[index]} clean")
        right.semilogy(range(1, len(noisy) + 1), [max(v, 1e-8) for v in noisy], color=color, linestyle="--",
                       label=f"{layers[index]} noisy")
    right.axhline(values["threshold"], color="gray", linewidth=0.8)
    right.set(xlabel="eigenvalue rank", ylabel="eigenvalue / largest", title="mean spectra")
    right.grid(alpha=0.3)
    right.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@harness.hookimpl
def register_metrics(register):
    register(TokenSpectrum)
