"""Granularities: how an attribution map is cut into regions that are ranked and moved.

``pixel`` (every pixel a region), ``patch:P`` (hard P x P squares, scored by summed attribution) and
``grid:G`` (G x G soft bilinear tents: the ``align_corners=True`` upsampling of a G x G indicator,
as in SAG; all G*G tents sum to 1 everywhere, so inserting all of them reproduces the image).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from harness.errors import HarnessError

_PATTERN = re.compile(r"^(pixel|patch:(\d+)|grid:(\d+))$")


@dataclass(frozen=True)
class Granularity:
    """A way of cutting an ``height x width`` image into ``n_regions`` regions."""

    kind: str
    size: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str, height: int, width: int) -> "Granularity":
        """``pixel`` | ``patch:P`` | ``grid:G`` for an image of ``height x width``."""
        match = _PATTERN.match(text.strip())
        if not match:
            raise HarnessError(f"granularity {text!r}: use pixel, patch:P or grid:G (e.g. patch:8, grid:7)")
        kind = match.group(1).split(":")[0]
        size = int(match.group(2) or match.group(3) or 1)
        if size < 1 or (kind == "grid" and size < 2):
            raise HarnessError(f"granularity {text!r}: the size must be at least {2 if kind == 'grid' else 1}")
        if kind != "pixel" and size > min(height, width):
            what = "a patch" if kind == "patch" else "a grid"
            raise HarnessError(
                f"granularity {text!r}: {what} of {size} is larger than the {height}x{width} model input; "
                f"use at most {min(height, width)}"
            )
        return cls(kind, size, height, width)

    @property
    def label(self) -> str:
        """The canonical text form."""
        return "pixel" if self.kind == "pixel" else f"{self.kind}:{self.size}"

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Rows and columns of regions."""
        if self.kind == "pixel":
            return self.height, self.width
        if self.kind == "patch":
            return -(-self.height // self.size), -(-self.width // self.size)
        return self.size, self.size

    @property
    def n_regions(self) -> int:
        """How many regions there are."""
        rows, cols = self.grid_shape
        return rows * cols

    @cached_property
    def _patch_index(self) -> torch.Tensor:
        rows = torch.arange(self.height) // self.size
        cols = torch.arange(self.width) // self.size
        return (rows[:, None] * self.grid_shape[1] + cols[None, :]).reshape(-1)

    @cached_property
    def tents(self) -> torch.Tensor:
        """(G*G, H*W) soft tents (grid only): row r is the upsampled indicator of cell r."""
        eye = torch.eye(self.n_regions).view(self.n_regions, 1, self.size, self.size)
        up = F.interpolate(eye, size=(self.height, self.width), mode="bilinear", align_corners=True)
        return up.view(self.n_regions, -1)

    def region_scores(self, attribution: torch.Tensor) -> torch.Tensor:
        """(B, H, W) attribution -> (B, n_regions) region scores."""
        flat = attribution.reshape(len(attribution), -1).float()
        if self.kind == "pixel":
            return flat
        if self.kind == "patch":
            index = self._patch_index.to(flat.device).expand_as(flat)
            return torch.zeros(len(flat), self.n_regions, device=flat.device).scatter_add_(1, index, flat)
        return flat @ self.tents.to(flat.device).T

    def render(self, keep: torch.Tensor) -> torch.Tensor:
        """(N, n_regions) region weights in [0, 1] -> (N, 1, H, W) pixel mask."""
        keep = keep.float()
        if self.kind == "pixel":
            return keep.view(-1, 1, self.height, self.width)
        if self.kind == "patch":
            return keep[:, self._patch_index.to(keep.device)].view(-1, 1, self.height, self.width)
        grid = keep.view(-1, 1, self.size, self.size)
        return F.interpolate(grid, size=(self.height, self.width), mode="bilinear", align_corners=True)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every region, 0 = most important; ties broken by region index (stable)."""
    order = torch.sort(-scores, dim=1, stable=True).indices
    return torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
