"""Bundled attributors: each produces a (B, H, W) map, higher = more important."""

from __future__ import annotations

import harness

from harness_plugins.attributors.gradcam import GradCAM
from harness_plugins.attributors.gradients import InputXGradient, Saliency
from harness_plugins.attributors.igos import IGOS
from harness_plugins.attributors.integrated_gradients import IntegratedGradients
from harness_plugins.attributors.maps import MapsAttributor
from harness_plugins.attributors.random_map import RandomMap
from harness_plugins.attributors.rise import RISE
from harness_plugins.attributors.smoothgrad import SmoothGrad

BUNDLED = (Saliency, InputXGradient, IntegratedGradients, SmoothGrad, GradCAM, RISE, IGOS, RandomMap)


@harness.hookimpl
def register_attributors(register):
    for attributor in BUNDLED:
        register(attributor)
    register(MapsAttributor)  # maps:PATH, maps computed elsewhere (not a method of its own)
