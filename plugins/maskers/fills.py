"""Fills: what removed pixels become. Every masker also carries a granularity option.

Fills are computed in the model's normalised input space; blur commutes with the per-channel
normalisation (a kernel summing to 1 under reflect padding), so blurring normalised inputs equals
normalising the blurred image.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.components import Masker, Options
from harness.model import LoadedModel


class FillOptions(Options):
    granularity: str | None = None
    """pixel | patch:P | grid:G; unset = the metric's default (insertion pixel, MoRF patch:8, SAG grid:7)."""


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel (OpenCV's definition for a given size and sigma)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def reflect_101_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` on both sides with reflect-101 borders
    (cv2's BORDER_REFLECT_101, scipy's 'mirror'), for any ``pad`` — even one larger than the axis."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def gaussian_blur(inputs: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect-101 borders (cv2.GaussianBlur's default)."""
    kernel = gaussian_kernel(size, sigma).to(inputs.device)
    channels = inputs.shape[1]
    pad = size // 2
    out = inputs
    for dim, shape in ((3, (1, size)), (2, (size, 1))):
        weight = kernel.view(1, 1, *shape).expand(channels, 1, *shape)
        padded = out.index_select(dim, reflect_101_index(out.shape[dim], pad, inputs.device))
        out = F.conv2d(padded, weight, groups=channels)
    return out


class BlurOptions(FillOptions):
    kernel_size: int = Field(51, ge=1)
    sigma: float = Field(50.0, gt=0)


class BlurFill(Masker):
    """Gaussian blur (kernel 51, sigma 50: the iGOS++/RISE insertion baseline)."""

    id: ClassVar[str] = "blur"
    Options = BlurOptions

    def baseline(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        size = self.options.kernel_size | 1  # odd
        return gaussian_blur(inputs, size, self.options.sigma)


class BlackFill(Masker):
    """Black pixels (zeros in pixel space, -mean/std after normalisation: SAG's fill)."""

    id: ClassVar[str] = "black"
    Options = FillOptions

    def baseline(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return model.normalise(torch.zeros_like(inputs))


class MeanFill(Masker):
    """The dataset mean colour (zeros after normalisation)."""

    id: ClassVar[str] = "mean"
    Options = FillOptions

    def baseline(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return torch.zeros_like(inputs)


class NoiseOptions(FillOptions):
    distribution: Literal["uniform", "gaussian"] = "uniform"
    std: float = Field(0.25, gt=0)
    """Standard deviation in pixel units for gaussian noise around 0.5 (clipped to [0, 1])."""


class NoiseFill(Masker):
    """Random pixels, seeded per sample: uniform in [0, 1] or N(0.5, std^2) clipped, in pixel space."""

    id: ClassVar[str] = "noise"
    Options = NoiseOptions

    def baseline(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        shape = inputs.shape[1:]
        noise = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(int(seed) ^ 0x5EED)
            if self.options.distribution == "uniform":
                noise.append(torch.rand(shape, generator=gen))
            else:
                noise.append((0.5 + self.options.std * torch.randn(shape, generator=gen)).clamp(0, 1))
        return model.normalise(torch.stack(noise).to(inputs.device))
