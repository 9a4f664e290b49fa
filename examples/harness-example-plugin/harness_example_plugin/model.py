"""``example_colour_net``: a tiny model whose logits are a fixed function of the image's colours.

For a normalised input ``x`` of shape (B, 3, H, W) the model computes six features per image, the
per-channel spatial mean and (population) standard deviation::

    f = [mean_hw(x[:, 0]), mean_hw(x[:, 1]), mean_hw(x[:, 2]), std_hw(x[:, 0]), std_hw(x[:, 1]), std_hw(x[:, 2])]

and returns ``logits = f @ W.T + b`` for 1000 classes. Its "pretrained" weights are not trained:
``W = WEIGHT_SCALE * randn(1000, 6)`` and ``b = BIAS_SCALE * randn(1000)``, drawn in that order
from ``torch.Generator().manual_seed(SEED)``, so they are identical on every machine and run.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.components import ModelSpec

MODEL_ID = "example_colour_net"
NUM_CLASSES = 1000
SEED = 0
WEIGHT_SCALE = 2.0
BIAS_SCALE = 0.5

DATA_CONFIG = {
    "input_size": (3, 64, 64),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "squash",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}
"""Preprocessing: resize the whole image to 64x64 (bilinear, no crop), scale to [0, 1], normalise."""


class ColourNet(nn.Module):
    """Per-channel mean and std pooling followed by one linear layer (6 -> 1000 logits)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.head = nn.Linear(6, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 6): per-channel spatial means, then per-channel spatial stds."""
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), correction=0)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.features(x))

    @torch.no_grad()
    def reset_to_fixed_weights(self, seed: int = SEED) -> "ColourNet":
        """Set the documented fixed weights (the model's "pretrained" weights); returns self."""
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(self.head.weight.shape, generator=generator) * WEIGHT_SCALE
        bias = torch.randn(self.head.bias.shape, generator=generator) * BIAS_SCALE
        self.head.weight.copy_(weight)
        self.head.bias.copy_(bias)
        return self


def build(pretrained: bool) -> ColourNet:
    """The fixed weights when ``pretrained``; otherwise PyTorch's default (global-RNG) init.

    harness calls ``build(False)`` for ``--random-init`` (after seeding torch) and before loading a
    ``--weights`` file, so the untrained architecture must come back in that case.
    """
    module = ColourNet()
    return module.reset_to_fixed_weights() if pretrained else module


def model_spec() -> ModelSpec:
    """The :class:`~harness.components.ModelSpec` registered as ``example_colour_net``."""
    return ModelSpec(
        id=MODEL_ID,
        build=build,
        description="Example plugin: fixed seeded linear map of per-channel colour mean/std (not trained)",
        data_config=dict(DATA_CONFIG),
        version="1",
    )
