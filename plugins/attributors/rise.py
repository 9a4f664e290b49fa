"""RISE (Petsiuk et al., BMVC 2018): random masks weighted by the masked images' scores."""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.batching import map_in_chunks
from harness.components import Attributor, Options
from harness.model import LoadedModel
from harness.scoring import target_scores


class RISEOptions(Options):
    masks: int = Field(4000, ge=1)
    """N: number of random masks (RISE: 4000 for ResNet-50)."""
    cells: int = Field(7, ge=1)
    """s: the binary grid is s x s before upsampling."""
    p: float = Field(0.5, gt=0, le=1)
    """Probability that a grid cell is kept."""
    mask_seed: int = 0
    """Seed of the mask set (shared by all images, as in RISE)."""
    score: Literal["softmax", "logit"] = "softmax"


def rise_masks(n: int, cells: int, p: float, height: int, width: int, seed: int) -> torch.Tensor:
    """(n, 1, H, W) masks: s x s Bernoulli(p) grids, bilinearly upsampled to (s+1) cells, randomly shifted."""
    gen = torch.Generator().manual_seed(seed)
    grid = (torch.rand(n, 1, cells, cells, generator=gen) < p).float()
    cell_h, cell_w = -(-height // cells), -(-width // cells)
    up = F.interpolate(grid, size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear", align_corners=False)
    dy = torch.randint(0, cell_h, (n,), generator=gen)
    dx = torch.randint(0, cell_w, (n,), generator=gen)
    masks = torch.stack([up[i, :, y : y + height, x : x + width] for i, (y, x) in enumerate(zip(dy.tolist(), dx.tolist()))])
    return masks.clamp_(0, 1)


class RISE(Attributor):
    """RISE: sum_i score(x * M_i) M_i / (N p) over N random masks (N = 4000, s = 7, p = 0.5).

    Masked-out pixels become 0 in normalised space (the dataset mean colour), as in RISE's code.
    """

    id: ClassVar[str] = "rise"
    Options = RISEOptions

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        o = self.options
        _, _, height, width = inputs.shape
        masks = rise_masks(o.masks, o.cells, o.p, height, width, o.mask_seed).to(inputs.device)
        n_images = len(inputs)

        forward = model.forward_module()

        def chunk(start: int, stop: int) -> torch.Tensor:
            rows = torch.arange(start, stop, device=inputs.device)
            image, mask = rows // o.masks, rows % o.masks
            return target_scores(forward(inputs[image] * masks[mask]), target[image], o.score)

        with torch.inference_mode():
            scores = map_in_chunks(n_images * o.masks, model.batch_size, chunk).view(n_images, o.masks)
        return (scores @ masks.view(o.masks, -1)).view(n_images, height, width) / (o.masks * o.p)
