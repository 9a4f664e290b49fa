"""MoRF and LeRF region perturbation (Samek et al. 2017; seed 004), with ABPC in the leaderboard."""

from __future__ import annotations

from typing import ClassVar

import harness
from harness_plugins.metrics.insertion_deletion import CurveMetric

CITATION = (
    "Samek, Binder, Montavon, Lapuschkin, Mueller. Evaluating the Visualization of What a Deep Neural "
    "Network Has Learned. IEEE TNNLS 2017"
)


class MoRF(CurveMetric):
    """MoRF: remove the most relevant regions first (patch:8 by default); lower AUC is better."""

    id: ClassVar[str] = "morf"
    higher_is_better: ClassVar[bool] = False
    default_masker: ClassVar[str] = "blur"
    default_granularity: ClassVar[str] = "patch:8"
    mode = "remove"
    order = "most"
    citation: ClassVar[str] = CITATION


class LeRF(CurveMetric):
    """LeRF: remove the least relevant regions first (patch:8 by default); higher AUC is better."""

    id: ClassVar[str] = "lerf"
    higher_is_better: ClassVar[bool] = True
    default_masker: ClassVar[str] = "blur"
    default_granularity: ClassVar[str] = "patch:8"
    mode = "remove"
    order = "least"
    citation: ClassVar[str] = CITATION


@harness.hookimpl
def register_metrics(register):
    register(MoRF)
    register(LeRF)
