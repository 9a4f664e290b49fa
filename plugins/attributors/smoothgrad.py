"""SmoothGrad (Smilkov et al. 2017): saliency averaged over noisy copies, all copies batched."""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
from pydantic import Field

from harness.components import Attributor, Options
from harness.model import LoadedModel
from harness.scoring import accumulate_gradients


class SmoothGradOptions(Options):
    samples: int = Field(25, ge=1)
    """n: noisy copies per image (seed 004: 25)."""
    sigma: float = Field(0.15, ge=0)
    """Noise level as a fraction of the input range (max - min) of each image (seed 004: 0.15)."""
    score: Literal["logit", "softmax"] = "logit"
    magnitude: Literal["abs_max", "raw_sum"] = "abs_max"
    """Per copy: saliency (|grad| max over channels, the default) or the signed gradient summed over channels."""


class SmoothGrad(Attributor):
    """SmoothGrad: mean saliency over n copies x + N(0, (sigma * (max - min))^2) (n = 25, sigma = 0.15)."""

    id: ClassVar[str] = "smoothgrad"
    Options = SmoothGradOptions

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        n = self.options.samples
        spans = (inputs.flatten(1).amax(1) - inputs.flatten(1).amin(1)).view(-1, 1, 1, 1)
        stds = self.options.sigma * spans
        # All n noise draws of image i come from a generator seeded with image i's seed, so the
        # result depends neither on batching nor on chunk retries.
        noise_cache: dict[int, torch.Tensor] = {}

        def noise(image: int) -> torch.Tensor:
            if image not in noise_cache:
                noise_cache.clear()
                generator = torch.Generator().manual_seed(int(seeds[image]))
                noise_cache[image] = torch.randn((n, *inputs.shape[1:]), generator=generator).to(inputs.device)
            return noise_cache[image]

        buffer: list[torch.Tensor] = []

        def make_rows(image: torch.Tensor, copy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Rows are image-major with consecutive copies, so a chunk is a few runs of one image:
            # each run is written into a reusable buffer as noise * std + x (the same values as
            # x + std * noise per row, without a Python loop over rows).
            if not buffer or len(buffer[0]) < len(image):
                buffer[:] = [torch.empty((len(image), *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)]
            out = buffer[0][: len(image)]
            row = 0
            for i, run in zip(*(t.tolist() for t in torch.unique_consecutive(image, return_counts=True))):
                first = int(copy[row])
                segment = out[row : row + run]
                torch.mul(noise(i)[first : first + run], stds[i], out=segment)
                segment.add_(inputs[i])
                row += run
            return out, target[image.to(target.device)]

        if self.options.magnitude == "abs_max":
            reduce = lambda grad, x: grad.abs().amax(1)  # noqa: E731
        else:
            reduce = lambda grad, x: grad.sum(1)  # noqa: E731
        return accumulate_gradients(model, len(inputs), n, make_rows, reduce, self.options.score) / n
