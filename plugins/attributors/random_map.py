"""A random attribution: the control every leaderboard should show."""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch

from harness.components import Attributor
from harness.model import LoadedModel


class RandomMap(Attributor):
    """Uniform noise in [0, 1) per pixel, seeded per sample (a baseline for faithfulness metrics)."""

    id: ClassVar[str] = "random"

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        _, _, height, width = inputs.shape
        maps = [torch.rand(height, width, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(maps).to(inputs.device)
