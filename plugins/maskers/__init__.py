"""Bundled maskers: fills (blur, black, mean, noise) x granularities (pixel, patch:P, grid:G)."""

from __future__ import annotations

import harness

from harness_plugins.maskers.fills import BlackFill, BlurFill, MeanFill, NoiseFill

BUNDLED = (BlurFill, BlackFill, MeanFill, NoiseFill)


@harness.hookimpl
def register_maskers(register):
    for masker in BUNDLED:
        register(masker)
