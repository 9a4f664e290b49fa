"""Trust in plugins and weight files (issue 11, items 3 and 5).

- A plugin that calls ``sys.exit()`` or raises any ``BaseException`` but ``KeyboardInterrupt`` at
  import, at registration or in a registration hook is reported and skipped; every command still runs.
- No plugin takes over a registry.toml alias (``resnet50``) or an id of a bundled plugin (even a
  switched-off one): rejected like any duplicate, both providers named.
- A torch file that pickles a blocked global (``posix.system``) gives the documented one line
  "not a weights-only torch file: it pickles <global>", never torch's advice to set
  ``weights_only=False``, and nothing in it runs.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from harness.plugins import PluginInfo, call_registrations, discover

GROUP = "harness"
FAKE_DIST, FAKE_VERSION = "harness-trust-fakes", "0.0.1"

METRIC_PLUGIN = '''
import harness
from harness.components import Metric, Summary


class {cls}(Metric):
    """A test plugin's metric."""

    id = "{id}"

    def evaluate(self, batch, ctx):
        return [{{"values": {{"v": 1.0}}}} for _ in batch.samples]

    def summarize(self, records, ctx):
        return Summary(value=1.0)


@harness.hookimpl
def register_metrics(register):
    register({cls})
'''

MODEL_PLUGIN = '''
import harness
from harness.components import ModelSpec


@harness.hookimpl
def register_models(register):
    register(ModelSpec(id="{id}", build=lambda pretrained: None, description="{description}"))
'''


def ep(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group=GROUP)


def accepted(infos: list[PluginInfo], pm) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []
    call_registrations(pm, infos, lambda kind, obj, info: got.append((kind, obj.id)))
    return got


def errors_of(infos: list[PluginInfo]) -> dict[str, list[str]]:
    return {i.name: i.errors for i in infos}


# -- 1. isolation against any BaseException but KeyboardInterrupt ---------------------------------------------
EXITS = pytest.mark.parametrize(
    "statement, error",
    [
        ("import sys; sys.exit()", "SystemExit"),
        ("import sys; sys.exit(3)", "SystemExit: 3"),
        ("raise SystemExit('bye   now')", "SystemExit: bye now"),
        ("raise GeneratorExit", "GeneratorExit"),
        ("class Boom(BaseException):\n    pass\nraise Boom('custom base exception')", "Boom: custom base exception"),
    ],
    ids=["sys-exit", "sys-exit-3", "system-exit", "generator-exit", "base-exception"],
)


@EXITS
def test_plugin_exiting_at_import_is_recorded_and_skipped(modules, statement, error):
    bad = modules("bad", statement + "\n")
    good = modules("good", METRIC_PLUGIN.format(cls="Good", id="trust_good"))
    pm, infos = discover(entry_points=[ep("bad", bad), ep("good", good)])
    assert errors_of(infos) == {"bad": [f"import failed: {error}"], "good": []}
    assert accepted(infos, pm) == [("metric", "trust_good")]


@EXITS
def test_plugin_exiting_in_a_registration_hook_is_recorded_and_skipped(modules, statement, error):
    body = textwrap.indent(statement, "    ")
    source = METRIC_PLUGIN.format(cls="Half", id="trust_half") + f"""

@harness.hookimpl
def register_maskers(register):
{body}
"""
    bad = modules("bad", source)
    good = modules("good", METRIC_PLUGIN.format(cls="Good", id="trust_good"))
    pm, infos = discover(entry_points=[ep("bad", bad), ep("good", good)])
    assert errors_of(infos) == {"bad": [], "good": []}
    assert accepted(infos, pm) == [("metric", "trust_good")]  # none of the failing plugin's components
    assert errors_of(infos) == {"bad": [f"register_maskers failed: {error}"], "good": []}


def test_plugin_exiting_while_pluggy_registers_it_is_recorded_and_unregistered(modules):
    bad = modules("bad", """
import sys

class Hostile:
    def __dir__(self):  # pluggy lists the plugin's attributes while registering it
        sys.exit("no registration for you")

plugin = Hostile()
""")
    good = modules("good", METRIC_PLUGIN.format(cls="Good", id="trust_good"))
    pm, infos = discover(entry_points=[ep("bad", f"{bad}:plugin"), ep("good", good)])
    assert errors_of(infos) == {"bad": ["registration failed: SystemExit: no registration for you"], "good": []}
    assert pm.get_plugin("None:bad") is None
    assert accepted(infos, pm) == [("metric", "trust_good")]


def test_component_whose_id_exits_is_recorded_and_the_others_are_kept(modules):
    from harness.components import COMPONENT_KINDS
    from harness.registry import _accept_into

    odd = modules("odd", METRIC_PLUGIN.format(cls="Fine", id="trust_fine") + """

class Sneaky:
    @property
    def id(self):
        raise SystemExit(2)


@harness.hookimpl
def register_attributors(register):
    register(Sneaky())
""")
    pm, infos = discover(entry_points=[ep("odd", odd)])
    components: dict[str, dict[str, Any]] = {kind: {} for kind in COMPONENT_KINDS}
    call_registrations(pm, infos, _accept_into(components, infos))
    assert errors_of(infos) == {"odd": ["attributor registration failed: SystemExit: 2"]}
    assert set(components["metric"]) == {"trust_fine"} and components["attributor"] == {}


def test_keyboard_interrupt_is_not_swallowed(modules):
    at_import = modules("ki_import", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        discover(entry_points=[ep("ki", at_import)])
    in_hook = modules("ki_hook", "import harness\n\n@harness.hookimpl\ndef register_metrics(register):\n"
                                 "    raise KeyboardInterrupt\n")
    pm, infos = discover(entry_points=[ep("ki", in_hook)])
    with pytest.raises(KeyboardInterrupt):
        accepted(infos, pm)


# -- the full registry and CLI with a real (temporary) distribution ------------------------------------------
@pytest.fixture
def install(tmp_path, monkeypatch, modules, fresh_registry):
    """``install({name: source})``: a distribution `harness-trust-fakes` on sys.path with these plugins."""
    monkeypatch.delenv("HARNESS_PLUGINS", raising=False)
    monkeypatch.delenv("HARNESS_DISABLE_PLUGINS", raising=False)

    def make(plugins: dict[str, str]) -> dict[str, str]:
        eps = {name: modules(name, source) for name, source in plugins.items()}
        site = tmp_path / "site"
        info = site / f"{FAKE_DIST.replace('-', '_')}-{FAKE_VERSION}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {FAKE_DIST}\nVersion: {FAKE_VERSION}\n",
                                       encoding="utf-8")
        lines = "".join(f"{name} = {module}\n" for name, module in eps.items())
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}", encoding="utf-8")
        monkeypatch.syspath_prepend(str(site))
        return eps

    return make


def _fake_plugins(cli) -> dict[str, dict[str, Any]]:
    res = cli("plugins", "--json")
    assert res.exit_code == 0 and "Traceback" not in res.stderr, res
    return {p["name"]: p for p in json.loads(res.stdout) if p["distribution"] == FAKE_DIST}


def test_exiting_plugins_leave_every_command_working(install, cli, tmp_path):
    install({
        "exits_on_import": "import sys\nsys.exit()\n",
        "exits_in_hook": "import harness, sys\n\n@harness.hookimpl\ndef register_metrics(register):\n"
                         "    sys.exit(5)\n",
        "generator_exit": "import harness\n\n@harness.hookimpl\ndef register_maskers(register):\n"
                          "    raise GeneratorExit('closed')\n",
        "good": METRIC_PLUGIN.format(cls="Good", id="trust_good_metric"),
    })
    infos = _fake_plugins(cli)
    assert infos["exits_on_import"]["errors"] == ["import failed: SystemExit"]
    assert infos["exits_in_hook"]["errors"] == ["register_metrics failed: SystemExit: 5"]
    assert infos["generator_exit"]["errors"] == ["register_maskers failed: GeneratorExit: closed"]
    assert infos["good"]["errors"] == [] and infos["good"]["components"] == {"metrics": ["trust_good_metric"]}

    text = cli("plugins")
    assert text.exit_code == 0
    assert f"exits_on_import ({FAKE_DIST} {FAKE_VERSION}) [ERROR]" in text.stdout
    assert "error: import failed: SystemExit" in text.stdout

    from harness.registry import get_registry

    get_registry.cache_clear()  # warnings are printed when the registry is built
    listed = cli("list", "metrics", "--json")
    assert listed.exit_code == 0, listed
    assert {"trust_good_metric", "insertion", "accuracy"} <= {r["id"] for r in json.loads(listed.stdout)}
    warnings = [line for line in listed.stderr.splitlines() if line.startswith("harness: warning: plugin")]
    for name in ("exits_on_import", "exits_in_hook", "generator_exit"):
        assert any(name in w for w in warnings), listed.stderr

    out = tmp_path / "out"
    run = cli("run", "--model", "test_resnet", "--random-init", "--metric", "accuracy", "--limit", "1", "--quiet",
              "--device", "cpu", "--out", out)
    assert run.exit_code == 0, run
    assert len(list(out.glob("*.json"))) == 1


# -- 2. aliases and bundled ids cannot be taken over ---------------------------------------------------------
def test_plugin_cannot_take_over_a_registry_alias(install, cli):
    install({
        "hijack": MODEL_PLUGIN.format(id="resnet50", description="not the pinned resnet50"),
        "own_model": MODEL_PLUGIN.format(id="trust_own_model", description="a new id"),
    })
    infos = _fake_plugins(cli)
    (error,) = infos["hijack"]["errors"]
    assert error.startswith("duplicate model id 'resnet50': already provided by registry.toml")
    assert f"ignored from {FAKE_DIST}:hijack" in error
    assert infos["hijack"]["components"] == {}
    assert infos["own_model"]["errors"] == [] and infos["own_model"]["components"] == {"models": ["trust_own_model"]}

    from harness.registry import get_registry

    reg = get_registry()
    spec = reg.model_spec("resnet50")
    assert spec.provider == "registry.toml" and spec.description != "not the pinned resnet50"
    assert reg.provider("model", "resnet50") == "registry.toml"
    assert "resnet50" in reg.aliases
    rows = {r["id"]: r for r in json.loads(cli("list", "models", "--json").stdout)}
    assert rows["trust_own_model"]["provider"] == f"{FAKE_DIST}:own_model"


@pytest.mark.parametrize("selection", [("HARNESS_DISABLE_PLUGINS", "accuracy"), ("HARNESS_PLUGINS", "takeover")],
                         ids=["bundled-disabled", "only-the-plugin"])
def test_plugin_cannot_take_over_the_id_of_a_switched_off_bundled_plugin(install, cli, monkeypatch, selection):
    install({"takeover": METRIC_PLUGIN.format(cls="FakeAccuracy", id="accuracy")})
    monkeypatch.setenv(*selection)
    infos = _fake_plugins(cli)
    (error,) = infos["takeover"]["errors"]
    assert error == (f"duplicate metric id 'accuracy': already provided by harness:accuracy (disabled); "
                     f"ignored from {FAKE_DIST}:takeover")
    assert infos["takeover"]["components"] == {}
    bundled = {p["name"]: p for p in json.loads(cli("plugins", "--json").stdout) if p["distribution"] == "harness"}
    assert bundled["accuracy"]["enabled"] is False and bundled["accuracy"]["components"] == {}
    assert "accuracy" not in {r["id"] for r in json.loads(cli("list", "metrics", "--json").stdout)}
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "accuracy", "--limit", "1")
    assert res.exit_code == 2 and "unknown metric 'accuracy'" in res.stderr


def test_bundled_plugins_register_no_alias_id(fresh_registry, monkeypatch):
    """The bundled plugins themselves hold no alias id (it would be rejected and warned on every command)."""
    monkeypatch.delenv("HARNESS_PLUGINS", raising=False)
    monkeypatch.delenv("HARNESS_DISABLE_PLUGINS", raising=False)
    from harness.registry import get_registry

    reg = get_registry()
    assert all(p.errors == [] for p in reg.plugins if p.bundled)
    assert not set(reg.aliases) & set(reg.components["model"])


# -- 3. a malicious pickle: one documented line, nothing runs -------------------------------------------------
def _exploit_file(path: Path, func, *args) -> Path:
    import torch

    class Exploit:
        def __reduce__(self):
            return (func, args)

    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Exploit()}, path)
    return path


@pytest.mark.parametrize(
    "func, args, culprit",
    [
        (os.system, ("touch {marker}",), f"{os.system.__module__}.system"),  # posix.system: a blocked module
        (subprocess.call, (["touch", "{marker}"],), ".call"),
        (exec, ("open({marker!r}, 'w').close()",), "builtins.exec"),
    ],
    ids=["os.system", "subprocess.call", "exec"],
)
def test_malicious_pickle_gives_the_documented_line_and_runs_nothing(tmp_path, func, args, culprit):
    from harness.errors import HarnessError
    from harness.weights import read_state_dict

    marker = tmp_path / "pwned"
    def fill(arg):
        return [fill(a) for a in arg] if isinstance(arg, list) else arg.format(marker=str(marker))

    args = tuple(fill(arg) for arg in args)
    path = _exploit_file(tmp_path / "evil.pt", func, *args)
    with pytest.raises(HarnessError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a weights-only torch file: it pickles ")
    name = message.split("it pickles ", 1)[1].split(";", 1)[0]
    assert name.endswith(culprit) and " " not in name, message
    assert message.endswith("; save the state dict alone, or convert it to .safetensors")
    assert "\n" not in message and "weights_only" not in message and "False" not in message, message
    assert not marker.exists()


def test_malicious_pickle_through_the_cli_is_one_line(cli, tmp_path):
    marker = tmp_path / "pwned"
    path = _exploit_file(tmp_path / "evil.pt", os.system, f"touch {marker}")
    res = cli("run", "--model", "test_resnet", "--weights", path, "--metric", "accuracy", "--limit", "1",
              "--device", "cpu", "--out", tmp_path / "out", "-q")
    assert res.exit_code == 2, res
    assert res.stderr.strip().splitlines() == [
        f"harness: error: {path} is not a weights-only torch file: it pickles {os.system.__module__}.system; "
        "save the state dict alone, or convert it to .safetensors"
    ]
    assert not marker.exists()


ADVICE = ("Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it can result in "
          "arbitrary code execution. Do it only if you got the file from a trusted source.")
TORCH_TEXTS = [  # what several torch versions say when weights-only loading refuses a global
    (f"Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
     f"`torch.load` from `False` to `True`. {ADVICE}\n\n\nTrying to load unsupported GLOBAL posix.system whose module "
     "posix is blocked.\n\nCheck the documentation of torch.load to learn more about types accepted by default with "
     "weights_only https://pytorch.org/docs/stable/generated/torch.load.html.", "posix.system"),
    ("Weights only load failed. This file can still be loaded, to do so you have two options, \x1b[1mdo those steps "
     f"only if you trust the source of the checkpoint\x1b[0m. \n\t(1) {ADVICE}\n\t(2) Alternatively, to load with "
     "`weights_only=True` please check the recommended steps in the following error message.\n\tWeightsUnpickler "
     "error: Unsupported global: GLOBAL nt.system was not an allowed global by default. Please use "
     "`torch.serialization.add_safe_globals([nt.system])` or the `torch.serialization.safe_globals([nt.system])` "
     "context manager to allowlist this global if you trust this class/function.", "nt.system"),
    (f"Weights only load failed. {ADVICE} WeightsUnpickler error: Unsupported class subprocess.Popen",
     "subprocess.Popen"),
    ("Unsupported global: GLOBAL eval was not an allowed global by default.", "builtins.eval"),
]


@pytest.mark.parametrize("text, name", TORCH_TEXTS, ids=["2.6-blocked", "2.4-global", "2.0-class", "builtin"])
def test_refused_global_is_read_from_every_torch_wording(text, name):
    from harness.weights import _not_weights_only_message

    message = _not_weights_only_message(Path("m.pt"), pickle.UnpicklingError(text))
    assert message == (f"m.pt is not a weights-only torch file: it pickles {name}; "
                       "save the state dict alone, or convert it to .safetensors")


@pytest.mark.parametrize("text, reason", [
    (f"Weights only load failed. {ADVICE}\n Please file an issue with the following so that we can make "
     "`weights_only=True` compatible with your use case: WeightsUnpickler error: \n\nUnsupported operand 149\n\n"
     "Check the documentation of torch.load.", "Unsupported operand 149"),
    (f"Weights only load failed. {ADVICE}", "it holds objects that weights-only loading refuses"),
], ids=["unnamed-reason", "advice-only"])
def test_unnamed_refusals_give_a_generic_line_without_the_advice(text, reason):
    from harness.weights import _not_weights_only_message

    message = _not_weights_only_message(Path("m.pt"), pickle.UnpicklingError(text))
    assert message == (f"m.pt is not a weights-only torch file: {reason}; "
                       "save the state dict alone, or convert it to .safetensors")
