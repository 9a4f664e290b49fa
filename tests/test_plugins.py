"""Plugin discovery and isolation (harness/plugins.py, harness/registry.py): broken plugins are recorded
and skipped, duplicates name both providers, invalid registrations are reported, and the
HARNESS_PLUGINS / HARNESS_DISABLE_PLUGINS selections; through `discover` with hand-made entry points
and through the full registry and CLI with a real (temporary) distribution on sys.path."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from harness.plugins import PluginInfo, call_registrations, discover

GROUP = "harness"
FAKE_DIST, FAKE_VERSION = "harness-test-fakes", "1.2.3"

HEADER = """
import harness
from harness.components import Attributor, Masker, Metric, ModelSpec, Summary
"""

METRIC = '''
class {cls}(Metric):
    """Mean top-1 probability (a test plugin's metric)."""

    id = "{id}"
    higher_is_better = False

    def evaluate(self, batch, ctx):
        probs = ctx.model.probs(batch.inputs(ctx.model))
        return [{{"prediction": int(p.argmax()), "values": {{"p": float(p.max())}}}} for p in probs]

    def summarize(self, records, ctx):
        values = [r["values"]["p"] for r in records]
        return Summary(value=sum(values) / len(values))
'''

MASKER = '''
class {cls}(Masker):
    """A masker from a test plugin."""

    id = "{id}"
'''


def metric_plugin(*ids: str) -> str:
    """Source of a plugin registering one metric per id."""
    classes = "".join(METRIC.format(cls=f"M{i}", id=mid) for i, mid in enumerate(ids))
    calls = "".join(f"    register(M{i})\n" for i in range(len(ids)))
    return HEADER + classes + "\n@harness.hookimpl\ndef register_metrics(register):\n" + calls


def ep(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group=GROUP)


def accepted_by(infos: list[PluginInfo], pm) -> list[tuple[str, str, str]]:
    """(kind, id, plugin name) of every component call_registrations hands over."""
    got: list[tuple[str, str, str]] = []
    call_registrations(pm, infos, lambda kind, obj, info: got.append((kind, getattr(obj, "id", repr(obj)), info.name)))
    return got


def by_name(infos: list[PluginInfo]) -> dict[str, PluginInfo]:
    return {i.name: i for i in infos}


def registry_accept(infos: list[PluginInfo], pm) -> dict[str, dict[str, Any]]:
    """Run the registry's own acceptance (validity, duplicates) over the plugins' registrations."""
    from harness.components import COMPONENT_KINDS
    from harness.registry import _accept_into

    components: dict[str, dict[str, Any]] = {kind: {} for kind in COMPONENT_KINDS}
    call_registrations(pm, infos, _accept_into(components, infos))
    return components


# -- discover: import failures, failing hooks ------------------------------------------------------------
def test_plugin_failing_to_import_is_recorded_and_the_rest_register(modules):
    broken = modules("broken", "raise RuntimeError('kaput on import')\n")
    good = modules("good", metric_plugin("fake_metric_good"))
    pm, infos = discover(entry_points=[ep("broken", broken), ep("good", good)])
    info = by_name(infos)
    assert info["broken"].errors == ["import failed: RuntimeError: kaput on import"]
    assert info["broken"].enabled is True and info["broken"].dist is None and info["broken"].module == broken
    assert info["good"].errors == []
    assert accepted_by(infos, pm) == [("metric", "fake_metric_good", "good")]


@pytest.mark.parametrize(
    "value, error",
    [
        ("hp_no_such_module_for_harness_tests", "import failed: ModuleNotFoundError"),
        ("json:no_such_attribute", "import failed: AttributeError"),
    ],
)
def test_entry_point_that_cannot_load_is_recorded(modules, value, error):
    good = modules("good", metric_plugin("fake_metric_good"))
    pm, infos = discover(entry_points=[ep("bad", value), ep("good", good)])
    assert by_name(infos)["bad"].errors[0].startswith(error)
    assert accepted_by(infos, pm) == [("metric", "fake_metric_good", "good")]


def test_plugin_whose_register_hook_raises_is_skipped_entirely(modules):
    half = modules("half", HEADER + MASKER.format(cls="HalfMasker", id="half_masker") + METRIC.format(cls="HalfMetric", id="half_metric") + """
@harness.hookimpl
def register_maskers(register):
    register(HalfMasker)  # called before register_metrics, fine on its own

@harness.hookimpl
def register_metrics(register):
    register(HalfMetric)
    raise ValueError("cannot   register\\n today")

@harness.hookimpl
def register_datasets(register):
    raise AssertionError("never called: the plugin already failed")
""")
    good = modules("good", metric_plugin("fake_metric_good"))
    pm, infos = discover(entry_points=[ep("half", half), ep("good", good)])
    info = by_name(infos)
    assert info["half"].errors == []  # importing and registering with pluggy worked
    components = registry_accept(infos, pm)
    assert info["half"].errors == ["register_metrics failed: ValueError: cannot register today"]
    assert info["half"].components == {}
    assert "half_masker" not in components["masker"] and "half_metric" not in components["metric"]
    assert set(components["metric"]) == {"fake_metric_good"}
    assert info["good"].components == {"metrics": ["fake_metric_good"]} and info["good"].errors == []


@pytest.mark.parametrize(
    "source",
    [
        "import harness\n\n@harness.hookimpl\ndef register_metric(register):\n    pass\n",  # misspelt hook
        "import harness\n\n@harness.hookimpl\ndef register_metrics(reg, extra):\n    pass\n",  # wrong arguments
    ],
    ids=["misspelt-hook", "wrong-arguments"],
)
def test_plugin_with_invalid_hookimpl_is_recorded_and_unregistered(modules, source):
    bad = modules("bad", source)
    good = modules("good", metric_plugin("fake_metric_good"))
    pm, infos = discover(entry_points=[ep("bad", bad), ep("good", good)])
    info = by_name(infos)
    assert len(info["bad"].errors) == 1 and info["bad"].errors[0].startswith("registration failed: PluginValidationError")
    assert bad not in {getattr(p, "__name__", None) for p in pm.get_plugins()}, "the invalid plugin stays registered"
    assert accepted_by(infos, pm) == [("metric", "fake_metric_good", "good")]


def test_same_entry_point_seen_twice_is_loaded_once(modules):
    good = modules("good", metric_plugin("fake_metric_good"))
    pm, infos = discover(entry_points=[ep("good", good), ep("good", good)])
    assert [i.name for i in infos] == ["good"]
    assert accepted_by(infos, pm) == [("metric", "fake_metric_good", "good")]


# -- duplicates and invalid registrations ------------------------------------------------------------------
def test_duplicate_id_between_plugins_names_both_providers(modules):
    first = modules("first", metric_plugin("shared_metric", "first_only"))
    second = modules("second", metric_plugin("shared_metric", "second_only"))
    pm, infos = discover(entry_points=[ep("zz_second", second), ep("aa_first", first)])
    components = registry_accept(infos, pm)
    info = by_name(infos)
    assert components["metric"]["shared_metric"].provider == "?:aa_first"  # plugins load in name order
    assert info["aa_first"].errors == []
    (error,) = info["zz_second"].errors
    assert "duplicate metric id 'shared_metric'" in error
    assert "?:aa_first" in error and "?:zz_second" in error
    # only the clashing component is refused; the plugin's other components stay
    assert set(components["metric"]) == {"shared_metric", "first_only", "second_only"}
    assert info["zz_second"].components == {"metrics": ["second_only"]}


def test_registrations_of_the_wrong_kind_are_reported_as_invalid(modules):
    source = HEADER + MASKER.format(cls="AMasker", id="a_masker") + METRIC.format(cls="GoodMetric", id="fine_metric") + '''
class NoId(Metric):
    """A metric class that forgot its id."""

spec = ModelSpec(id="tiny_fake_model", build=lambda pretrained: None)

@harness.hookimpl
def register_metrics(register):
    register("not a component")
    register(AMasker)          # a masker handed to the metric hook
    register(GoodMetric())     # an instance, not the class
    register(NoId)
    register(GoodMetric)

@harness.hookimpl
def register_models(register):
    register("resnet50")
    register(spec)
'''
    odd = modules("odd", source)
    pm, infos = discover(entry_points=[ep("odd", odd)])
    components = registry_accept(infos, pm)
    errors = by_name(infos)["odd"].errors
    assert errors[0] == "registered an invalid model: 'resnet50'"
    invalid_metrics = [e for e in errors if e.startswith("registered an invalid metric: ")]
    assert len(invalid_metrics) == 4, errors
    assert "'not a component'" in invalid_metrics[0]
    assert "AMasker" in invalid_metrics[1] and "GoodMetric" in invalid_metrics[2] and "NoId" in invalid_metrics[3]
    assert len(errors) == 5
    # the valid registrations of the same plugin are kept
    assert set(components["metric"]) == {"fine_metric"} and set(components["model"]) == {"tiny_fake_model"}
    assert components["masker"] == {}


# -- HARNESS_PLUGINS / HARNESS_DISABLE_PLUGINS ----------------------------------------------------------
@pytest.fixture
def three(modules):
    """Three plugins; `a` fails on import (so a disabled `a` shows it was never imported)."""
    a = modules("a", "raise RuntimeError('a was imported')\n")
    b = modules("b", metric_plugin("metric_b"))
    c = modules("c", metric_plugin("metric_c"))
    return [ep("a", a), ep("b", b), ep("c", c)]


def _state(infos: list[PluginInfo]) -> dict[str, tuple[bool, list[str]]]:
    return {i.name: (i.enabled, i.errors) for i in infos}


def test_harness_plugins_keeps_only_the_named_plugins(three, monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", "b")
    monkeypatch.delenv("HARNESS_DISABLE_PLUGINS", raising=False)
    pm, infos = discover(entry_points=three)
    assert _state(infos) == {"a": (False, []), "b": (True, []), "c": (False, [])}
    assert accepted_by(infos, pm) == [("metric", "metric_b", "b")]


def test_harness_disable_plugins_drops_the_named_plugins(three, monkeypatch):
    monkeypatch.delenv("HARNESS_PLUGINS", raising=False)
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", " a , c ,")
    pm, infos = discover(entry_points=three)
    assert _state(infos) == {"a": (False, []), "b": (True, []), "c": (False, [])}
    assert accepted_by(infos, pm) == [("metric", "metric_b", "b")]
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", "b")
    pm, infos = discover(entry_points=three)
    assert [i.name for i in infos if not i.enabled] == ["b"]
    assert by_name(infos)["a"].errors == ["import failed: RuntimeError: a was imported"]
    assert accepted_by(infos, pm) == [("metric", "metric_c", "c")]


def test_selection_by_module_name_and_both_variables(three, monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", f"b,{three[2].value}")  # an entry-point name and a module name
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", "b")
    pm, infos = discover(entry_points=three)
    assert _state(infos) == {"a": (False, []), "b": (False, []), "c": (True, [])}
    assert accepted_by(infos, pm) == [("metric", "metric_c", "c")]


@pytest.mark.parametrize("value", [
    "",
    "  ",
    ",",
])
def test_empty_selection_variables_select_everything(three, monkeypatch, value):
    monkeypatch.setenv("HARNESS_PLUGINS", value)
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", value)
    pm, infos = discover(entry_points=three)
    assert [i.enabled for i in infos] == [True, True, True]


# -- the full registry and CLI with a real distribution on sys.path -----------------------------------------
@pytest.fixture
def fake_dist(tmp_path, monkeypatch, modules, fresh_registry):
    """A distribution `harness-test-fakes` (a .dist-info folder on sys.path) with five plugins."""
    eps = {
        "broken_import": modules("broken_import", "raise ImportError('missing dependency: frobnicate')\n"),
        "broken_hook": modules("broken_hook", HEADER + METRIC.format(cls="X", id="never_metric") + """
@harness.hookimpl
def register_metrics(register):
    register(X)
    1 / 0
"""),
        "dupe": modules("dupe", metric_plugin("insertion", "dupe_extra_metric")),
        "good": modules("good", metric_plugin("fake_good_metric")),
        "wrong_kind": modules("wrong_kind", "import harness\n\n@harness.hookimpl\ndef register_maskers(register):\n"
                                            "    register('blur but a string')\n"),
    }
    site = tmp_path / "site"
    info = site / f"{FAKE_DIST.replace('-', '_')}-{FAKE_VERSION}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {FAKE_DIST}\nVersion: {FAKE_VERSION}\n", encoding="utf-8")
    lines = "".join(f"{name} = {module}\n" for name, module in eps.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}", encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("HARNESS_PLUGINS", raising=False)
    monkeypatch.delenv("HARNESS_DISABLE_PLUGINS", raising=False)
    # the distribution is visible to the ordinary entry-point lookup discover() uses
    assert {e.name for e in metadata.entry_points(group=GROUP) if e.dist and e.dist.name == FAKE_DIST} == set(eps)
    return eps


def _fake_infos(cli) -> dict[str, dict[str, Any]]:
    res = cli("plugins", "--json")
    assert res.exit_code == 0 and "Traceback" not in res.stderr, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout) if p["distribution"] == FAKE_DIST}


def test_plugins_json_reports_broken_plugins_with_their_errors(fake_dist, cli):
    infos = _fake_infos(cli)
    assert set(infos) == set(fake_dist)
    for name, info in infos.items():
        assert info["version"] == FAKE_VERSION and info["bundled"] is False and info["enabled"] is True
        assert info["module"] == fake_dist[name]
    assert infos["broken_import"]["errors"] == ["import failed: ImportError: missing dependency: frobnicate"]
    assert infos["broken_import"]["components"] == {}
    assert infos["broken_hook"]["errors"] == ["register_metrics failed: ZeroDivisionError: division by zero"]
    assert infos["broken_hook"]["components"] == {}
    (dup,) = infos["dupe"]["errors"]
    assert "duplicate metric id 'insertion'" in dup
    assert "harness:insertion_deletion" in dup and f"{FAKE_DIST}:dupe" in dup
    assert infos["dupe"]["components"] == {"metrics": ["dupe_extra_metric"]}
    assert infos["wrong_kind"]["errors"] == ["registered an invalid masker: 'blur but a string'"]
    assert infos["good"]["errors"] == [] and infos["good"]["components"] == {"metrics": ["fake_good_metric"]}
    # the bundled plugins are untouched
    bundled = {p["name"]: p for p in json.loads(cli("plugins", "--json").stdout) if p["distribution"] == "harness"}
    assert bundled["insertion_deletion"]["errors"] == []
    assert bundled["insertion_deletion"]["components"]["metrics"] == ["insertion", "deletion"]


def test_plugins_text_marks_broken_plugins(fake_dist, cli):
    res = cli("plugins")
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith(f"broken_import ({FAKE_DIST} {FAKE_VERSION}) [ERROR]"))
    assert "error: import failed: ImportError: missing dependency: frobnicate" in lines[head + 1]
    assert any(l.startswith(f"good ({FAKE_DIST} {FAKE_VERSION}) [ok]") for l in lines)


def test_registry_keeps_working_with_broken_plugins(fake_dist, cli, tmp_path):
    res = cli("list", "metrics", "--json")
    assert res.exit_code == 0 and "Traceback" not in res.stderr
    rows = {r["id"]: r for r in json.loads(res.stdout)}
    assert rows["insertion"]["provider"] == "harness:insertion_deletion"  # the bundled one wins
    assert rows["fake_good_metric"]["provider"] == f"{FAKE_DIST}:good"
    assert rows["fake_good_metric"]["higher_is_better"] is False
    assert rows["dupe_extra_metric"]["provider"] == f"{FAKE_DIST}:dupe"
    assert "never_metric" not in rows
    maskers = {r["id"] for r in json.loads(cli("list", "maskers", "--json").stdout)}
    assert {"blur", "black", "mean", "noise"} <= maskers

    from harness.registry import get_registry

    from harness_plugins.metrics.insertion_deletion import Insertion

    assert get_registry().get("metric", "insertion") is Insertion

    # a third-party metric runs end to end with no change to the core
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "fake_good_metric", "--limit", "2",
              "--quiet", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    result = json.loads(Path(res.stdout.strip().rsplit(" -> ", 1)[1]).read_text(encoding="utf-8"))
    assert result["status"] == "ok" and 0.0 < result["value"] <= 1.0
    assert result["metric"] == {"id": "fake_good_metric", "version": "1", "higher_is_better": False, "options": {}}
    assert result["provenance"]["plugins"][FAKE_DIST] == FAKE_VERSION


def test_broken_plugin_is_reported_as_a_warning(fake_dist, cli):
    res = cli("list", "metrics")
    assert res.exit_code == 0
    warnings = [l for l in res.stderr.splitlines() if "warning" in l]
    assert any("broken_import" in l for l in warnings), res.stderr
    assert any("broken_hook" in l for l in warnings), res.stderr


def test_disable_plugins_through_the_cli(fresh_registry, cli, monkeypatch):
    monkeypatch.delenv("HARNESS_PLUGINS", raising=False)
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", "accuracy")
    infos = {p["name"]: p for p in json.loads(cli("plugins", "--json").stdout) if p["distribution"] == "harness"}
    assert infos["accuracy"]["enabled"] is False and infos["accuracy"]["components"] == {}
    assert infos["accuracy"]["errors"] == []
    assert infos["insertion_deletion"]["enabled"] is True
    assert "accuracy (harness " in cli("plugins").stdout and "[disabled]" in cli("plugins").stdout
    metrics = {r["id"] for r in json.loads(cli("list", "metrics", "--json").stdout)}
    assert "accuracy" not in metrics and {"insertion", "deletion"} <= metrics
    res = cli("run", "--model", "efficientnet_lite0", "--metric", "accuracy")
    assert res.exit_code == 2 and "unknown metric 'accuracy'" in res.stderr and "Traceback" not in res.stderr


def test_only_named_plugins_through_the_cli(fresh_registry, cli, monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", "insertion_deletion,datasets")
    monkeypatch.delenv("HARNESS_DISABLE_PLUGINS", raising=False)
    infos = json.loads(cli("plugins", "--json").stdout)
    assert {p["name"] for p in infos if p["enabled"]} == {"insertion_deletion", "datasets"}
    assert all(p["components"] == {} for p in infos if not p["enabled"])
    data = json.loads(cli("list", "--json").stdout)
    assert {r["id"] for r in data["metrics"]} == {"insertion", "deletion"}
    assert data["attributors"] == [] and data["maskers"] == []
    # selecting by distribution name keeps every bundled plugin
    monkeypatch.setenv("HARNESS_PLUGINS", "harness")
    from harness.registry import get_registry

    get_registry.cache_clear()
    infos = json.loads(cli("plugins", "--json").stdout)
    assert all(p["enabled"] for p in infos if p["distribution"] == "harness")
