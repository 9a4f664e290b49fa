"""Bundled attributors: each produces a (B, H, W) map, higher = more important."""

from __future__ import annotations

import harness

from harness_plugins.attributors.gradients import InputXGradient, Saliency
from harness_plugins.attributors.random_map import RandomMap

BUNDLED = (Saliency, InputXGradient, RandomMap)


@harness.hookimpl
def register_attributors(register):
    for attributor in BUNDLED:
        register(attributor)
