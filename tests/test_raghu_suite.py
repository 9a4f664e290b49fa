"""The raghu2021 suite (seed 001) carries linear probes and spatial localisation next to CKA,
attention distance and norm ratio, and its seed-001 metrics run on a labelled folder."""

from __future__ import annotations

import json
from pathlib import Path

from _labelled import make_labelled_folder
from conftest import run_cli


def test_raghu2021_suite_has_every_seed001_analysis():
    from harness.registry import get_registry
    from harness.runner import RunConfig
    from harness.suites import expand_suite

    reg = get_registry()
    configs = expand_suite("raghu2021", RunConfig(models=[], metric="", data="imagefolder:/nonexistent"), reg)
    metrics = {c.metric for c in configs}
    assert {"cka", "cka_cross", "attention_distance", "norm_ratio", "linear_probe", "spatial_localisation"} <= metrics
    probe = [c for c in configs if c.metric == "linear_probe"]
    assert sorted(m for c in probe for m in c.models) == ["convnext_t", "deit_s", "resnet50", "vit_b16"]
    spatial = next(c for c in configs if c.metric == "spatial_localisation")
    assert "metric.minibatch=128" in spatial.options


def test_probe_and_localisation_run_on_a_labelled_folder(tmp_path):
    root = make_labelled_folder(tmp_path / "data", classes=3, per_class=4, size=32)
    out = tmp_path / "out"
    for metric, options in (("linear_probe", ["-o", "metric.shots=2"]), ("spatial_localisation", [])):
        res = run_cli("run", "--model", "test_vit", "--random-init", "--metric", metric, "--data", f"imagefolder:{root}",
                      *options, "--batch-size", "4", "--out", str(out), "--quiet")
        assert res.exit_code == 0, res.stderr
    results = {json.loads(p.read_text())["metric"]["id"]: json.loads(p.read_text()) for p in Path(out).glob("*.json")}
    probe = results["linear_probe"]["values"]
    assert set(probe["accuracy"]) == {"cls", "gap", "token"} and probe["chance"] == 1 / 3
    assert all(0.0 <= a <= 1.0 for accs in probe["accuracy"].values() for a in accs if a is not None)
    assert 0.0 <= results["spatial_localisation"]["value"] <= 1.0


def test_model_option_replaces_the_suite_models_everywhere():
    """`--suite raghu2021 --model test_vit` runs test_vit only, also for attention_distance (whose
    suite entry names the transformers)."""
    from harness.registry import get_registry
    from harness.runner import RunConfig
    from harness.suites import expand_suite

    configs = expand_suite("raghu2021", RunConfig(models=["test_vit"], metric="", data="samples"), get_registry())
    assert {tuple(c.models) for c in configs} == {("test_vit",)}
