"""The example third-party plugin (examples/harness-example-plugin) installed with pip, end to end.

The distribution is pip-installed into this interpreter's environment for the module and
uninstalled afterwards; discovery, listing, runs, the leaderboard and option errors all go through
the real entry-point machinery, exactly as for any plugin on PyPI.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "examples" / "harness-example-plugin"
DIST = "harness-example-plugin"
PACKAGE = "harness_example_plugin"
PROVIDER = f"{DIST}:example"  # <distribution>:<entry-point name>
MODEL, METRIC = "example_colour_net", "example_confidence"


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def _forget_plugin() -> None:
    """Drop cached imports, import-system caches and the registry so discovery starts afresh."""
    from harness.registry import get_registry

    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    get_registry.cache_clear()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example distribution, pip-installed for this module (from a copy: no build litter)."""
    source = tmp_path_factory.mktemp("example-plugin-src") / PLUGIN_DIR.name
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _pip("install", "--no-deps", "--no-build-isolation", "-q", str(source))
    _forget_plugin()
    try:
        yield
    finally:
        _pip("uninstall", "-y", "-q", DIST)
        _forget_plugin()
    from harness.registry import get_registry

    assert MODEL not in get_registry().components["model"], "example plugin still discoverable after uninstall"
    get_registry.cache_clear()


def _run(cli, out: Path, metric: str, *extra: str) -> dict:
    """``harness run`` of ``metric`` on the example model and the first 2 samples; the result JSON."""
    res = cli("run", "--model", MODEL, "--metric", metric, "--data", "samples", "--limit", "2",
              "--device", "cpu", "--quiet", "--out", out, *extra)
    assert res.exit_code == 0, res.stderr
    path = Path(res.stdout.strip().rsplit(" -> ", 1)[1])
    result = json.loads(path.read_text())
    assert result["status"] == "ok" and result["metric"]["id"] == metric
    return result


def test_listed_with_provider(installed, cli):
    models = cli("list", "models", "--json")
    assert models.exit_code == 0, models.stderr
    rows = {r["id"]: r for r in json.loads(models.stdout)}
    assert rows[MODEL]["provider"] == PROVIDER

    metrics = cli("list", "metrics", "--json")
    assert metrics.exit_code == 0, metrics.stderr
    rows = {r["id"]: r for r in json.loads(metrics.stdout)}
    assert rows[METRIC]["provider"] == PROVIDER
    assert rows[METRIC]["higher_is_better"] is True and rows[METRIC]["citation"]
    assert rows[METRIC]["options"] == {"temperature": "1.0"}


def test_plugins_lists_distribution(installed, cli):
    res = cli("plugins", "--json")
    assert res.exit_code == 0, res.stderr
    plugins = json.loads(res.stdout)
    assert all(not p["errors"] for p in plugins), plugins
    (ours,) = [p for p in plugins if p["distribution"] == DIST]
    assert ours["name"] == "example" and ours["module"] == PACKAGE
    assert ours["version"] == "0.1.0" and not ours["bundled"] and ours["enabled"]
    assert ours["components"] == {"models": [MODEL], "metrics": [METRIC]}


def test_fresh_process_discovers_plugin(installed):
    """No in-process cache tricks: a new ``python -m harness`` finds the installed distribution."""
    proc = subprocess.run([sys.executable, "-m", "harness", "plugins"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("example "))
    assert line == f"example ({DIST} 0.1.0) [ok] {PACKAGE}"


def _independent_confidences(n: int) -> torch.Tensor:
    """Top-1 softmax probabilities of the first ``n`` samples, computed without harness's pipeline."""
    import numpy as np
    from PIL import Image

    from harness.registry import get_registry
    from harness_example_plugin.model import DATA_CONFIG, build

    size = DATA_CONFIG["input_size"][1:]
    mean = torch.tensor(DATA_CONFIG["mean"]).view(3, 1, 1)
    std = torch.tensor(DATA_CONFIG["std"]).view(3, 1, 1)
    samples = get_registry().get("dataset", "samples")().samples()[:n]
    inputs = []
    for sample in samples:
        with Image.open(sample.path) as img:
            # crop_mode squash + crop_pct 1.0: the whole image resized to (H, W); PIL wants (W, H)
            small = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
        inputs.append((pixels - mean) / std)
    with torch.no_grad():
        logits = build(pretrained=True).eval()(torch.stack(inputs))
    return logits.softmax(-1).max(-1).values


def test_run_value_matches_samples_and_independent_computation(installed, cli, tmp_path):
    result = _run(cli, tmp_path, METRIC)
    records = [json.loads(line) for line in (tmp_path / f"{result['run_id']}.samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in records] == ["chelsea", "coffee"]
    per_sample = [r["values"]["confidence"] for r in records]
    assert result["value"] == pytest.approx(sum(per_sample) / len(per_sample), abs=1e-12)
    assert result["dataset"]["n_samples"] == 2 and result["stderr"] is not None
    assert result["provenance"]["plugins"][DIST] == "0.1.0"

    expected = _independent_confidences(2)
    assert per_sample == pytest.approx(expected.tolist(), abs=1e-5)
    assert result["value"] == pytest.approx(expected.mean().item(), abs=1e-5)
    # sanity: the fixed weights do not make every image look the same
    assert 1 / 1000 < result["value"] < 1


def test_pretrained_weights_are_fixed(installed):
    from harness_example_plugin.model import build

    a, b = build(pretrained=True).state_dict(), build(pretrained=True).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_temperature_option(installed, cli, tmp_path):
    hot = _run(cli, tmp_path, METRIC, "-o", "metric.temperature=4")
    plain = _run(cli, tmp_path, METRIC)
    assert hot["metric"]["options"] == {"temperature": 4.0} and hot["run_id"] != plain["run_id"]
    assert hot["value"] < plain["value"]  # a higher temperature flattens the softmax


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_bad_temperature_is_one_line_exit_2(installed, cli, tmp_path, value):
    res = cli("run", "--model", MODEL, "--metric", METRIC, "--data", "samples", "--limit", "2",
              "--quiet", "--out", tmp_path, "-o", f"metric.temperature={value}")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "metric.temperature" in lines[0], res.stderr
    assert not list(tmp_path.glob("*.json"))


def test_leaderboard_has_row_and_columns(installed, cli, tmp_path):
    ours = _run(cli, tmp_path, METRIC)
    accuracy = _run(cli, tmp_path, "accuracy")
    assert accuracy["values"]["n_labelled"] == 2

    res = cli("leaderboard", tmp_path, "--format", "json")
    assert res.exit_code == 0, res.stderr
    (board,) = json.loads(res.stdout)["tables"]  # one dataset and sample set: one table
    columns = {c["name"]: c for c in board["columns"]}
    ours_column = [name for name in columns if name.startswith(METRIC)]
    assert len(ours_column) == 1 and "accuracy" in columns
    assert columns[ours_column[0]]["higher_is_better"] is True
    rows = {r["model"]: r for r in board["rows"]}
    assert MODEL in rows, list(rows)
    assert rows[MODEL]["cells"][ours_column[0]]["value"] == pytest.approx(ours["value"])
    assert rows[MODEL]["cells"]["accuracy"]["value"] == pytest.approx(accuracy["value"])

    markdown = cli("leaderboard", tmp_path, "--format", "markdown")
    assert markdown.exit_code == 0, markdown.stderr
    header = next(line for line in markdown.stdout.splitlines() if line.startswith("| model"))
    assert METRIC in header and "accuracy" in header
    assert any(line.startswith(f"| {MODEL} ") for line in markdown.stdout.splitlines())
