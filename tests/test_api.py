"""The Python API (harness.evaluate): ids through the same runner as `harness run`, a user's module,
tensors, Datasets and DataLoaders, callable attributors, precomputed maps, options, out= and the
leaderboard; and the `attributors` suite."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import harness
from harness.errors import HarnessError

SIZE = 16


class TinyNet(torch.nn.Module):
    """A small CNN on (B, 3, 16, 16) inputs, 5 classes."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.head(x.flatten(1))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, SIZE, SIZE, generator=g), torch.tensor([0, 1, 2, 3])


def _evaluate(model, data, attributor="saliency", **kw):
    kw.setdefault("steps", 4)
    return harness.evaluate(model, data, "insertion", attributor, batch_size=4, quiet=True, **kw)


# -- ids: the same runner as `harness run` ---------------------------------------------------------------
def test_evaluate_with_ids_equals_harness_run(cli, tmp_path):
    args = ("--model", "test_resnet", "--random-init", "--metric", "insertion", "--attributor", "saliency",
            "--limit", "2", "-o", "metric.steps=4", "--batch-size", "4")
    res = cli("run", *args, "--out", tmp_path / "cli", "--quiet")
    assert res.exit_code == 0, res.stderr
    (path,) = (tmp_path / "cli").glob("*.json")
    from_cli = json.loads(path.read_text())
    cli_lines = [json.loads(line) for line in path.with_name(f"{from_cli['run_id']}.samples.jsonl").read_text().splitlines()]

    ev = harness.evaluate("test_resnet", "samples", "insertion", "saliency", random_init=True, limit=2, steps=4,
                          batch_size=4, out=tmp_path / "api", quiet=True)
    assert isinstance(ev, harness.Result) and isinstance(ev, harness.Evaluation)
    assert ev.run_id == from_cli["run_id"]
    assert ev.value == from_cli["value"] and ev.stderr == from_cli["stderr"]
    assert [r["values"] for r in ev.records] == [r["values"] for r in cli_lines]
    assert ev.path == tmp_path / "api" / f"{ev.run_id}.json" and ev.path.is_file()
    assert (tmp_path / "api" / f"{ev.run_id}.samples.jsonl").is_file()
    assert ev.provenance.argv == ["harness.evaluate"]
    assert ev.provenance.model_extra["run_config"]["models"] == ["test_resnet"]  # verifiable like a CLI run


# -- a user's module and tensors ---------------------------------------------------------------------------
def test_user_module_on_tensors(batch):
    from harness.weights import state_dict_sha256

    net = TinyNet()
    net.train()
    ev = _evaluate(net, batch)
    (model,) = ev.models
    assert model.id == "TinyNet" and model.model_extra["user_model"] is True
    assert model.weights_sha256 == state_dict_sha256(net) and model.random_init is False
    assert model.source == model.weights == f"python:{__name__}.TinyNet"
    assert ev.dataset.id == "tensors" and ev.dataset.n_samples == 4
    assert [r["sample_id"] for r in ev.records] == ["0", "1", "2", "3"]
    assert [r["label"] for r in ev.records] == [0, 1, 2, 3]
    assert ev.value == pytest.approx(np.mean(ev.per_sample("auc")))
    assert ev.provenance.model_extra["run_config"] is None  # objects cannot be rebuilt by `harness verify`
    # the module is handed back as it was
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert "forward" not in net.__dict__
    # identity covers content: same objects -> same run; other parameters or other pixels -> another run
    assert _evaluate(net, batch).run_id == ev.run_id
    assert _evaluate(TinyNet(seed=1), batch).run_id != ev.run_id
    x, y = batch
    assert _evaluate(net, (x + 0.01, y)).run_id != ev.run_id


def test_dataset_and_dataloader_give_the_tensors_numbers(batch):
    x, y = batch
    net = TinyNet()
    tensors = _evaluate(net, (x, y))
    dataset = torch.utils.data.TensorDataset(x, y)
    from_dataset = _evaluate(net, dataset)
    from_loader = _evaluate(net, torch.utils.data.DataLoader(dataset, batch_size=3))
    assert from_dataset.dataset.id == from_loader.dataset.id == "torch.TensorDataset"
    for other in (from_dataset, from_loader):
        assert other.per_sample("auc") == tensors.per_sample("auc")
        assert other.dataset.model_extra["samples_sha256"] == tensors.dataset.model_extra["samples_sha256"]
    limited = _evaluate(net, dataset, limit=2)
    assert limited.per_sample("auc") == tensors.per_sample("auc")[:2]
    named = _evaluate(net, torch.utils.data.DataLoader(dataset), data_name="my-set")
    assert named.dataset.id == "my-set" and named.per_sample("auc") == tensors.per_sample("auc")
    with pytest.raises(HarnessError, match="registered dataset id"):
        _evaluate(net, dataset, data_name="samples")
    with pytest.raises(HarnessError, match="no ':' or '/'"):
        _evaluate(net, dataset, data_name="a:b")


def test_preprocessing_config_is_recorded(batch):
    ev = _evaluate(TinyNet(), batch, preprocessing={"mean": (0, 0, 0), "std": (1, 1, 1)})
    pre = ev.models[0].model_extra["preprocessing"]
    assert pre["mean"] == [0, 0, 0] and pre["std"] == [1, 1, 1] and pre["input_size"] == [3, SIZE, SIZE]
    with pytest.raises(HarnessError, match="unknown key"):
        _evaluate(TinyNet(), batch, preprocessing={"size": 3})


# -- attributors: callables and precomputed maps ---------------------------------------------------------------
def _saliency_maps(net, x):
    """The bundled saliency maps of x for the clean top-1 class (insertion's default target)."""
    from harness_plugins.attributors.gradients import Saliency
    from conftest import wrap_module

    model = wrap_module(net, SIZE)
    target = model.logits(x).argmax(1)
    return Saliency().attribute(model, x, target, [0] * len(x))


def test_precomputed_maps_give_the_bundled_attributors_numbers(batch):
    x, _ = batch
    net = TinyNet()
    bundled = _evaluate(net, batch, "saliency")
    maps = _saliency_maps(net, x)
    for given in (maps, maps.numpy(), {str(i): maps[i].numpy() for i in range(len(maps))}):
        ev = _evaluate(net, batch, given)
        assert ev.per_sample("auc") == bundled.per_sample("auc")
        assert ev.attributor.id == "maps" and len(ev.attributor.model_extra["maps_sha256"]) == 64
    # (N, C, H, W) maps are reduced by the signed channel sum
    thirds = (maps / 3).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    assert _evaluate(net, batch, thirds).per_sample("auc") == pytest.approx(bundled.per_sample("auc"), abs=1e-6)
    # other maps -> another run
    assert _evaluate(net, batch, maps.flip(-1)).run_id != bundled.run_id


def test_callable_attributor(batch):
    x, _ = batch
    net = TinyNet()
    seen = {}

    def channel_saliency(module, inputs, targets):
        seen["module"], seen["targets"] = module, targets
        inputs.requires_grad_(True)
        scores = module(inputs).gather(1, targets.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(scores, inputs)
        return grad.abs().numpy()  # (B, C, H, W), numpy: reduced by the channel sum

    ev = _evaluate(net, batch, channel_saliency)
    assert seen["module"] is net and seen["targets"].tolist() == net(x).argmax(1).tolist()
    assert ev.attributor.id == "callable.test_callable_attributor.<locals>.channel_saliency".replace("<", "_").replace(">", "_")
    assert len(ev.attributor.model_extra["code_sha256"]) == 64
    # the same maps, precomputed, give the same numbers
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(xg).gather(1, net(x).argmax(1).view(-1, 1)).sum(), xg)
    assert ev.per_sample("auc") == pytest.approx(_evaluate(net, batch, grad.abs().sum(1)).per_sample("auc"), abs=1e-6)
    with pytest.raises(HarnessError, match="returned shape"):
        _evaluate(net, batch, lambda m, i, t: torch.zeros(len(i), SIZE))


# -- options and errors ------------------------------------------------------------------------------------------
def test_options_are_validated_like_dash_o(batch):
    net = TinyNet()
    ev = _evaluate(net, batch, steps=3, masker_options={"granularity": "patch:4"}, metric_options={"score": "logit"})
    assert ev.metric.options["steps"] == 3 and ev.metric.options["score"] == "logit"
    assert ev.masker.options["granularity"] == "patch:4"
    with pytest.raises(HarnessError, match=r"option metric.steps: .*expected an integer"):
        _evaluate(net, batch, steps="many")
    with pytest.raises(HarnessError, match="unknown option metric.stepz"):
        _evaluate(net, batch, metric_options={"stepz": 3})
    with pytest.raises(HarnessError, match="matches no component"):
        _evaluate(net, batch, stepz=3)


@pytest.mark.parametrize("maps, message", [
    (torch.zeros(3, SIZE, SIZE), "3 maps for 4 samples"),
    (torch.zeros(4, SIZE), "expected \\(N, H, W\\) or \\(N, C, H, W\\)"),
    (torch.zeros(4, 8, 8), "is 8x8 but the model's input is 16x16"),
    ({"0": np.zeros((SIZE, SIZE))}, "no map for 3 sample"),
])
def test_wrong_maps_are_one_line_errors(batch, maps, message):
    with pytest.raises(HarnessError, match=message) as info:
        _evaluate(TinyNet(), batch, maps)
    assert "\n" not in str(info.value)


def test_bilinear_resize_of_smaller_maps(batch):
    coarse = torch.rand(4, 4, 4)
    ev = _evaluate(TinyNet(), batch, coarse, attributor_options={"resize": "bilinear"})
    assert ev.attributor.options["resize"] == "bilinear"


@pytest.mark.parametrize("data, message", [
    (torch.zeros(4, SIZE, SIZE), "images must be \\(N, C, H, W\\)"),
    ((torch.zeros(4, 3, SIZE, SIZE), [0, 1]), "4 images but 2 labels"),
    (42, "expected an id/spec string"),
])
def test_wrong_data_are_one_line_errors(data, message):
    with pytest.raises(HarnessError, match=message):
        _evaluate(TinyNet(), data)


def test_module_options_for_ids_only(batch):
    with pytest.raises(HarnessError, match="apply to registered model ids"):
        _evaluate(TinyNet(), batch, random_init=True)


# -- out= and the leaderboard --------------------------------------------------------------------------------------
def test_out_writes_files_the_leaderboard_reads(cli, batch, tmp_path):
    from harness.results import read_result

    net = TinyNet()
    ev = _evaluate(net, batch, out=tmp_path)
    assert read_result(ev.path).run_id == ev.run_id
    table = cli("leaderboard", tmp_path)
    assert table.exit_code == 0, table.stderr
    assert f"TinyNet [user model {ev.models[0].weights_sha256[:8]}]" in table.stdout
    assert ev.provenance.model_extra["python_objects"] == ["data", "model"]
    check = cli("verify", ev.path)
    assert check.exit_code == 2 and "made by harness.evaluate from Python objects (data, model)" in check.stderr
    # save() writes a kept-in-memory result the same way
    other = _evaluate(net, batch, "random")
    assert other.path is None
    saved = other.save(tmp_path / "later")
    assert read_result(saved).value == other.value
    assert len((tmp_path / "later" / f"{other.run_id}.samples.jsonl").read_text().splitlines()) == 4


# -- the attributors suite -----------------------------------------------------------------------------------------
def test_attributors_suite_runs_every_installed_attributor():
    from harness.components import Attributor
    from harness.objects import overlay
    from harness.registry import get_registry
    from harness.runner import RunConfig
    from harness.suites import expand_suite

    reg = get_registry()
    base = RunConfig(models=[], metric="", data="samples")
    configs = expand_suite("attributors", base, reg)
    assert {c.metric for c in configs} == {"insertion", "deletion", "morf", "lerf"}
    used = {c.attributor for c in configs}
    assert {"saliency", "integrated_gradients", "gradcam", "random"} <= used
    assert "maps" in reg.components["attributor"] and "maps" not in used  # needs a PATH
    assert len(configs) == 4 * len(used) and {m for c in configs for m in c.models} == {"resnet50"}

    class NewMethod(Attributor):
        """A third-party method."""

        id = "third_party.new_method"

    with_new = overlay(reg, (), [("attributor", NewMethod)])
    configs = expand_suite("attributors", dataclasses.replace(base, models=["test_resnet"]), with_new)
    assert sum(c.attributor == "third_party.new_method" for c in configs) == 4
    assert {m for c in configs for m in c.models} == {"test_resnet"}  # --model replaces the suite's models


def test_available_lists_ids():
    assert "insertion" in harness.available("metrics") and "saliency" in harness.available("attributor")
    assert "attributors" in harness.available("suites")
    with pytest.raises(HarnessError, match="unknown kind"):
        harness.available("widgets")
