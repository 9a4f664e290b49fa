"""An example harness plugin: one model and one metric, registered through the ``harness`` hooks.

Installed, it is found through the entry point ``example = "harness_example_plugin"`` (group
``harness``) in this distribution's ``pyproject.toml``; ``harness plugins`` then lists it.
"""

from __future__ import annotations

from typing import Callable

import harness
from harness_example_plugin.metric import ExampleConfidence
from harness_example_plugin.model import ColourNet, model_spec

__version__ = "0.1.0"
__all__ = ["ColourNet", "ExampleConfidence", "model_spec", "register_models", "register_metrics"]


@harness.hookimpl
def register_models(register: Callable) -> None:
    """Register the model spec of ``example_colour_net``."""
    register(model_spec())


@harness.hookimpl
def register_metrics(register: Callable) -> None:
    """Register the ``example_confidence`` metric class."""
    register(ExampleConfidence)
