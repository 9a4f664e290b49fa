"""harness: a plugin-based evaluation harness for how vision models decide.

Plugins implement the hooks in :mod:`harness.hookspecs` and mark them with :data:`hookimpl`.

The public surface is ``__all__``: what plugins and notebooks may import from ``harness`` (``import
harness; harness.evaluate(...)``, ``from harness import Metric, Options``). Every other module is
internal and may change. Names are imported on first use, so ``import harness`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "harness"
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for plugin hook implementations: ``@harness.hookimpl``."""

_EXPORTS = {
    # the Python API
    "evaluate": "harness.api",
    "Evaluation": "harness.api",
    "available": "harness.api",
    "Result": "harness.results",
    "read_result": "harness.results",
    "HarnessError": "harness.errors",
    # component base classes and what they are given
    "Component": "harness.components",
    "Attributor": "harness.components",
    "Masker": "harness.components",
    "Metric": "harness.components",
    "Dataset": "harness.components",
    "ModelSpec": "harness.components",
    "Options": "harness.components",
    "Summary": "harness.components",
    "Batch": "harness.data",
    "Sample": "harness.data",
    "LoadedModel": "harness.model",
    "MetricContext": "harness.runner",
    # reusable pieces for metrics
    "perturbation_curves": "harness.sweep",
    "Granularity": "harness.regions",
    "target_scores": "harness.scoring",
    "input_gradients": "harness.scoring",
    "mean_stderr": "harness.stats",
}

__all__ = [
    "__version__", "PROJECT_NAME", "hookimpl",
    "evaluate", "Evaluation", "available", "Result", "read_result", "HarnessError",
    "Component", "Attributor", "Masker", "Metric", "Dataset", "ModelSpec", "Options", "Summary",
    "Batch", "Sample", "LoadedModel", "MetricContext",
    "perturbation_curves", "Granularity", "target_scores", "input_gradients", "mean_stderr",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily (__getattr__)
    from harness.api import Evaluation, available, evaluate
    from harness.components import Attributor, Component, Dataset, Masker, Metric, ModelSpec, Options, Summary
    from harness.data import Batch, Sample
    from harness.errors import HarnessError
    from harness.model import LoadedModel
    from harness.regions import Granularity
    from harness.results import Result, read_result
    from harness.runner import MetricContext
    from harness.scoring import input_gradients, target_scores
    from harness.stats import mean_stderr
    from harness.sweep import perturbation_curves


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
