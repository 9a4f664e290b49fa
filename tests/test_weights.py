"""--weights files (safetensors / weights-only torch) and --random-init: loading, checks, errors, CLI."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.model import load_model
from harness.registry import get_registry
from harness.weights import load_checked, read_state_dict, state_dict_sha256

ANSI = re.compile(r"\x1b\[")


class NotATensor:
    """A custom class: a pickle holding one is not weights-only."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.fixture(scope="module")
def spec():
    return get_registry().model_spec("test_resnet")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random-init test_resnet state dict saved as .safetensors and as a torch file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1234)
    module = timm.create_model("test_resnet", pretrained=False)
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    root = tmp_path_factory.mktemp("weights")
    save_file(state, str(root / "model.safetensors"))
    torch.save(state, root / "model.pt")
    return {"state": state, "root": root, "sha256": state_dict_sha256(module)}


def _assert_equal_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    assert set(own) == set(state)
    for key, tensor in state.items():
        assert torch.equal(own[key].cpu(), tensor), key


def _fails(spec, path) -> str:
    with pytest.raises(HarnessError) as info:
        load_model(spec, weights=path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- loading -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_weights_file_loads_exactly(spec, saved, name):
    path = saved["root"] / name
    model = load_model(spec, weights=path)
    _assert_equal_state(model.module, saved["state"])
    assert model.weights == str(path)
    assert model.random_init is False
    assert model.weights_sha256 == saved["sha256"]
    assert model.provenance()["weights"] == str(path)
    assert model.provenance()["weights_sha256"] == saved["sha256"]


def test_weights_file_loads_from_a_str_path(spec, saved):
    model = load_model(spec, weights=str(saved["root"] / "model.safetensors"))
    assert model.weights_sha256 == saved["sha256"]


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "state_dict_ema"])
def test_wrapped_checkpoint_loads(spec, saved, tmp_path, wrapper):
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: saved["state"], "epoch": 7, "best_acc": 0.5}, path)
    model = load_model(spec, weights=path)
    _assert_equal_state(model.module, saved["state"])


def test_module_prefix_is_dropped(spec, saved, tmp_path):
    path = tmp_path / "dp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved["state"].items()}}, path)
    _assert_equal_state(load_model(spec, weights=path).module, saved["state"])


def test_module_prefix_is_dropped_in_safetensors(spec, saved, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "dp.safetensors"
    save_file({f"module.{k}": v for k, v in saved["state"].items()}, str(path))
    _assert_equal_state(load_model(spec, weights=path).module, saved["state"])


def test_read_state_dict_returns_the_tensors(saved):
    tensors = read_state_dict(saved["root"] / "model.safetensors")
    assert set(tensors) == set(saved["state"])
    assert all(torch.equal(tensors[k], v) for k, v in saved["state"].items())


# -- errors --------------------------------------------------------------------------------------------
def test_missing_key_is_named(spec, saved, tmp_path):
    state = dict(saved["state"])
    del state["fc.bias"]
    torch.save(state, tmp_path / "missing.pt")
    message = _fails(spec, tmp_path / "missing.pt")
    assert "1 missing key(s): fc.bias" in message
    assert "unexpected" not in message


def test_unexpected_key_is_named(spec, saved, tmp_path):
    state = dict(saved["state"], **{"extra_head.weight": torch.zeros(3)})
    torch.save(state, tmp_path / "unexpected.pt")
    message = _fails(spec, tmp_path / "unexpected.pt")
    assert "1 unexpected key(s): extra_head.weight" in message
    assert "missing" not in message


def test_shape_mismatch_names_key_and_both_shapes(spec, saved, tmp_path):
    from safetensors.torch import save_file

    state = dict(saved["state"])
    state["fc.weight"] = torch.zeros(10, state["fc.weight"].shape[1])
    state["fc.bias"] = torch.zeros(10)
    save_file(state, str(tmp_path / "tenclass.safetensors"))
    message = _fails(spec, tmp_path / "tenclass.safetensors")
    width = saved["state"]["fc.weight"].shape[1]
    assert f"fc.weight (10, {width}) vs model (1000, {width})" in message
    assert "fc.bias (10,) vs model (1000,)" in message
    assert "tenclass.safetensors" in message


def test_many_missing_keys_are_summarised(spec, saved, tmp_path):
    state = {k: v for i, (k, v) in enumerate(saved["state"].items()) if i >= 10}
    torch.save(state, tmp_path / "partial.pt")
    message = _fails(spec, tmp_path / "partial.pt")
    assert "10 missing key(s)" in message and "(+6 more)" in message


def test_load_checked_leaves_the_module_untouched_on_error(saved):
    import timm

    module = timm.create_model("test_resnet", pretrained=False)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    bad = dict(saved["state"])
    del bad["conv1.0.weight"]
    with pytest.raises(HarnessError):
        load_checked(module, bad, "bad")
    _assert_equal_state(module, before)


def test_missing_file(spec, tmp_path):
    message = _fails(spec, tmp_path / "nope.safetensors")
    assert "not found" in message and "nope.safetensors" in message


def test_a_folder_is_not_a_weights_file(spec, tmp_path):
    assert "not found" in _fails(spec, tmp_path)


UNSAFE_PAYLOADS = pytest.mark.parametrize(
    "payload, culprit",
    [
        (lambda sd: {"state_dict": sd, "extra": NotATensor()}, "NotATensor"),
        (lambda sd: {"state_dict": sd, "hook": os.path.join}, "join"),
    ],
    ids=["custom-class", "function"],
)


@UNSAFE_PAYLOADS
def test_pickle_with_python_objects_is_rejected(spec, saved, tmp_path, payload, culprit):
    path = tmp_path / "unsafe.pt"
    torch.save(payload(saved["state"]), path)
    message = _fails(spec, path)
    assert "not a weights-only torch file" in message
    assert "unsafe.pt" in message
    assert ".safetensors" in message  # says what to do instead


@UNSAFE_PAYLOADS
def test_not_weights_only_message_is_plain_and_names_the_object(spec, saved, tmp_path, payload, culprit):
    """The reason torch gives sits past the 160-character cut, and torch's text has terminal escapes."""
    path = tmp_path / "unsafe.pt"
    torch.save(payload(saved["state"]), path)
    message = _fails(spec, path)
    assert not ANSI.search(message), repr(message)
    assert culprit in message, message  # which Python object made it unsafe


def test_pickle_with_python_objects_never_runs_code(spec, saved, tmp_path):
    """weights_only=True: unpickling must not call arbitrary callables."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "exploit.pt"
    torch.save({"state_dict": saved["state"], "x": Exploit()}, path)
    with pytest.raises(HarnessError, match="not a weights-only torch file"):
        load_model(spec, weights=path)
    assert not marker.exists()


def test_counter_next_to_tensors_is_no_state_dict(spec, tmp_path):
    path = tmp_path / "counter.pt"
    torch.save({"w": torch.zeros(2), "counts": collections.Counter(a=1)}, path)
    message = _fails(spec, path)
    assert "counter.pt" in message and "state dict" in message


@pytest.mark.parametrize("obj", [[torch.zeros(1)], torch.zeros(3), {}, {"w": torch.zeros(2), "epoch": 3}],
                         ids=["list", "tensor", "empty", "mixed"])
def test_torch_file_without_a_state_dict(spec, tmp_path, obj):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    assert "holds no state dict" in _fails(spec, path)


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(spec, saved, tmp_path, how):
    data = (saved["root"] / "model.safetensors").read_bytes()
    body = {"garbage": b"\x00\x01not safetensors" * 10, "truncated": data[: len(data) // 2], "empty": b""}[how]
    path = tmp_path / "broken.safetensors"
    path.write_bytes(body)
    message = _fails(spec, path)
    assert "cannot read" in message and "broken.safetensors" in message and "safetensors" in message


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_torch_file(spec, saved, tmp_path, how):
    data = (saved["root"] / "model.pt").read_bytes()
    body = {"garbage": b"not a torch file " * 10, "truncated": data[: len(data) // 2]}[how]
    path = tmp_path / "broken.pt"
    path.write_bytes(body)
    assert "broken.pt" in _fails(spec, path)


def test_weights_and_random_init_exclude_each_other(spec, saved):
    with pytest.raises(HarnessError, match="exclude"):
        load_model(spec, weights=saved["root"] / "model.pt", random_init=True)


# -- the CLI -----------------------------------------------------------------------------------------
def _bad_files(root: Path, state: dict[str, torch.Tensor]) -> dict[str, tuple[Path, str]]:
    """name -> (file, text the error must contain)."""
    from safetensors.torch import save_file

    unsafe = root / "unsafe.pt"
    torch.save({"state_dict": state, "extra": NotATensor()}, unsafe)
    wrong = dict(state, **{"fc.weight": torch.zeros(10, state["fc.weight"].shape[1]), "fc.bias": torch.zeros(10)})
    save_file(wrong, str(root / "tenclass.safetensors"))
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage")
    return {
        "missing-file": (root / "does_not_exist.safetensors", "not found"),
        "not-weights-only": (unsafe, "weights-only"),
        "shape-mismatch": (root / "tenclass.safetensors", "fc.weight"),
        "corrupt": (corrupt, "cannot read"),
    }


@pytest.mark.parametrize("case", ["missing-file", "not-weights-only", "shape-mismatch", "corrupt"])
def test_cli_bad_weights_exit_2_with_one_line(cli, saved, tmp_path, case):
    bad, expected = _bad_files(tmp_path, saved["state"])[case]
    out = tmp_path / "out"
    result = cli("run", "--model", "test_resnet", "--weights", bad, "--metric", "accuracy", "--limit", "1",
                 "--out", out, "--device", "cpu", "-q")
    assert result.exit_code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("harness: error:")
    assert bad.name in lines[0] and expected in lines[0]
    assert "Traceback" not in result.stderr and not ANSI.search(result.stderr)
    assert not list(out.glob("*.json")) if out.exists() else True


def test_cli_good_weights_are_recorded(cli, saved, tmp_path):
    import json

    out = tmp_path / "out"
    path = saved["root"] / "model.safetensors"
    result = cli("run", "--model", "test_resnet", "--weights", path, "--metric", "accuracy", "--limit", "1",
                 "--out", out, "--device", "cpu", "-q")
    assert result.exit_code == 0, result
    [file] = [p for p in out.glob("*.json")]
    entry = json.loads(file.read_text())["models"][0]
    assert entry["weights"] == str(path)
    assert entry["weights_sha256"] == saved["sha256"]
    assert entry["random_init"] is False


def test_cli_weights_and_random_init_together(cli, saved, tmp_path):
    result = cli("run", "--model", "test_resnet", "--weights", saved["root"] / "model.pt", "--random-init",
                 "--metric", "accuracy", "--limit", "1", "--out", tmp_path / "out", "--device", "cpu", "-q")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "exclude" in result.stderr


# -- --random-init -------------------------------------------------------------------------------------
def test_random_init_is_seeded(spec):
    a = load_model(spec, random_init=True, seed=0)
    b = load_model(spec, random_init=True, seed=0)
    c = load_model(spec, random_init=True, seed=1)
    assert a.weights_sha256 == b.weights_sha256
    assert a.weights_sha256 != c.weights_sha256
    _assert_equal_state(b.module, a.module.state_dict())
    assert a.random_init is True and a.weights == "random-init(seed=0)" and c.weights == "random-init(seed=1)"
    assert a.provenance()["random_init"] is True


def test_random_init_sha_ignores_the_global_rng_state(spec):
    torch.manual_seed(99)
    a = load_model(spec, random_init=True, seed=3)
    torch.rand(1000)
    b = load_model(spec, random_init=True, seed=3)
    assert a.weights_sha256 == b.weights_sha256


def test_state_dict_sha256_sees_every_byte():
    module = torch.nn.Linear(3, 2)
    before = state_dict_sha256(module)
    assert state_dict_sha256(module) == before
    with torch.no_grad():
        module.bias[1] += 1e-6
    assert state_dict_sha256(module) != before
    other = torch.nn.Linear(3, 2)
    other.load_state_dict(module.state_dict())
    assert state_dict_sha256(other) == state_dict_sha256(module)
    other.half()
    assert state_dict_sha256(other) != state_dict_sha256(module)  # dtype is part of the digest
