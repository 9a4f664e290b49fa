"""The declared public surface: ``harness.__all__`` is what plugins and notebooks may import."""

from __future__ import annotations

import inspect
import subprocess
import sys

import harness

PUBLIC = {
    # package
    "__version__", "PROJECT_NAME", "hookimpl",
    # the Python API
    "evaluate", "Evaluation", "available", "Result", "read_result", "HarnessError",
    # component base classes and what they are given
    "Component", "Attributor", "Masker", "Metric", "Dataset", "ModelSpec", "Options", "Summary",
    "Batch", "Sample", "LoadedModel", "MetricContext",
    # reusable pieces for metrics
    "perturbation_curves", "Granularity", "target_scores", "input_gradients", "mean_stderr",
}


def test_all_is_pinned():
    assert len(harness.__all__) == len(set(harness.__all__))
    assert set(harness.__all__) == PUBLIC, (
        "harness.__all__ changed: update PUBLIC here (and the README) only on purpose; "
        f"added {sorted(set(harness.__all__) - PUBLIC)}, removed {sorted(PUBLIC - set(harness.__all__))}"
    )


def test_every_public_name_resolves_and_is_documented():
    for name in harness.__all__:
        value = getattr(harness, name)
        if callable(value) and name != "hookimpl":
            assert inspect.getdoc(value), f"harness.{name} has no docstring"
    namespace: dict = {}
    exec("from harness import *", namespace)
    assert PUBLIC <= set(namespace)
    assert set(dir(harness)) >= PUBLIC


def test_public_names_are_the_internal_objects():
    from harness.api import evaluate
    from harness.components import Attributor, Metric, Options
    from harness.errors import HarnessError
    from harness.results import Result

    assert harness.evaluate is evaluate and harness.Result is Result and harness.HarnessError is HarnessError
    assert harness.Attributor is Attributor and harness.Metric is Metric and harness.Options is Options
    assert issubclass(harness.Evaluation, harness.Result)


def test_unknown_names_raise_attribute_error():
    try:
        harness.not_a_public_name  # noqa: B018
    except AttributeError as exc:
        assert "not_a_public_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_harness_stays_light():
    code = "import sys, harness; print('torch' in sys.modules, 'pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_plugin_written_against_the_surface_only():
    """A metric and an attributor that import nothing but ``harness`` run through evaluate()."""
    import torch

    class Confidence(harness.Metric):
        """Mean top-1 softmax confidence."""

        id = "test_confidence"

        def evaluate(self, batch: harness.Batch, ctx: harness.MetricContext):
            probs = ctx.model.probs(batch.inputs(ctx.model))
            return [{"prediction": int(i), "values": {"confidence": float(p)}} for p, i in zip(*probs.max(1), strict=True)]

        def summarize(self, records, ctx):
            value, stderr = harness.mean_stderr([r["values"]["confidence"] for r in records])
            return harness.Summary(value=value, stderr=stderr)

    from unittest import mock

    from harness.objects import overlay  # internal: only to register the test metric without installing it
    from harness.registry import get_registry

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    registry = overlay(get_registry(), (), [("metric", Confidence)])
    with mock.patch("harness.registry.get_registry", return_value=registry):
        ev = harness.evaluate(net, torch.rand(2, 3, 4, 4), "test_confidence", batch_size=2, quiet=True)
    assert 1 / 3 <= ev.value <= 1 and len(ev.records) == 2 and ev.records[0]["label"] is None
