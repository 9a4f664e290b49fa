"""ABN models and the ``abn`` attributor (plugins/models/abn.py): parameter counts, the authors'
checkpoint format (names written out here from the reference ``models/imagenet/resnet.py``; torch
0.4.0 files without ``num_batches_tracked``, DataParallel ``module.`` prefix, legacy serialisation),
the attention mechanism g' = (1 + M) * g, the training loss, and the attributor in an insertion run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import wrap_module
from harness.errors import HarnessError

COUNTS = {"abn_resnet50": 43_584_866, "abn_resnet101": 62_576_994, "abn_resnet152": 78_220_642}
LAYERS = {"abn_resnet50": (3, 4, 6, 3), "abn_resnet101": (3, 4, 23, 3), "abn_resnet152": (3, 8, 36, 3)}


def _bn(prefix: str, c: int, tracked: bool) -> list[tuple[str, tuple[int, ...]]]:
    keys = [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)), (f"{prefix}.running_var", (c,))]
    return keys + ([(f"{prefix}.num_batches_tracked", ())] if tracked else [])


def _stage(prefix: str, cin: int, planes: int, blocks: int, tracked: bool):
    keys = []
    for j in range(blocks):
        p = f"{prefix}.{j}"
        inp = cin if j == 0 else planes * 4
        keys += [(f"{p}.conv1.weight", (planes, inp, 1, 1))] + _bn(f"{p}.bn1", planes, tracked)
        keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes, tracked)
        keys += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1))] + _bn(f"{p}.bn3", planes * 4, tracked)
        if j == 0:
            keys += [(f"{p}.downsample.0.weight", (planes * 4, cin, 1, 1))] + _bn(f"{p}.downsample.1", planes * 4, tracked)
    return keys


def reference_keys(layers: tuple[int, int, int, int], classes: int = 1000, tracked: bool = True):
    """The reference ABN-ResNet state dict, in order: (name, shape)."""
    keys = [("conv1.weight", (64, 3, 7, 7))] + _bn("bn1", 64, tracked)
    keys += _stage("layer1", 64, 64, layers[0], tracked) + _stage("layer2", 256, 128, layers[1], tracked)
    keys += _stage("layer3", 512, 256, layers[2], tracked)
    keys += _stage("att_layer4", 1024, 512, layers[3], tracked) + _bn("bn_att", 2048, tracked)
    keys += [("att_conv.weight", (classes, 2048, 1, 1))] + _bn("bn_att2", classes, tracked)
    keys += [("att_conv2.weight", (classes, classes, 1, 1)), ("att_conv3.weight", (1, classes, 3, 3))]
    keys += _bn("bn_att3", 1, tracked)
    keys += _stage("layer4", 1024, 512, layers[3], tracked)
    keys += [("fc.weight", (classes, 2048)), ("fc.bias", (classes,))]
    return keys


def _meta(name: str):
    from harness_plugins.models.abn import create_abn

    with torch.device("meta"):
        return create_abn(name)


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts_and_state_dict_equal_the_reference(name):
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == COUNTS[name]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == reference_keys(LAYERS[name])


def test_authors_checkpoint_format_loads_strictly(tmp_path):
    """imagenet.py's save_checkpoint under DataParallel and torch 0.4.0: no num_batches_tracked, legacy format."""
    from harness.model import load_model
    from harness.registry import get_registry

    state = {}
    for i, (key, shape) in enumerate(reference_keys(LAYERS["abn_resnet50"], tracked=False)):
        state[key] = torch.full(shape, 1.0 + (i % 7) / 10) if "running_var" in key else torch.full(shape, (i % 13) / 100)
    checkpoint = {
        "epoch": 90, "arch": "resnet50", "best_acc": torch.tensor(76.9),
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [1, 2]}]},
    }
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    loaded = load_model(get_registry().model_spec("abn_resnet50"), weights=path)
    own = loaded.module.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    assert {k for k in own if k not in state} == {k for k in own if k.endswith("num_batches_tracked")}


def test_pretrained_points_to_the_authors_checkpoint():
    from harness.registry import get_registry

    with pytest.raises(HarnessError) as err:
        get_registry().model_spec("abn_resnet101").build(True)
    assert "drive.google.com/open?id=1B5jBHTfskKAgNpsFm9iADn1lskn2UWyk" in str(err.value)
    assert "--weights" in str(err.value)


@pytest.fixture(scope="module")
def abn():
    from harness_plugins.models.abn import ABNResNet

    torch.manual_seed(0)
    model = ABNResNet("resnet50", num_classes=10)
    with torch.no_grad():  # non-trivial statistics so that M varies over the map
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_map_in_unit_interval_and_perception_input_is_one_plus_m_times_g(abn):
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))  # adaptive pools: any size
    with torch.no_grad():
        out = abn.forward_branches(x)
        logits = abn(x)
        m = abn.attention_map(x)
        g = abn.layer3(abn.layer2(abn.layer1(abn.maxpool(abn.relu(abn.bn1(abn.conv1(x)))))))
        per = abn.fc(abn.layer4((1 + out.attention_map) * g).mean((2, 3)))
    assert out.attention_map.shape == (2, 1, 6, 8) and out.features.shape == (2, 1024, 6, 8)
    assert (out.attention_map >= 0).all() and (out.attention_map <= 1).all()
    assert out.attention_map.std() > 1e-3  # a real map, not a constant
    torch.testing.assert_close(out.features, g)
    torch.testing.assert_close(out.weighted_features, (1 + out.attention_map) * out.features)
    torch.testing.assert_close(out.logits, per, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(m, out.attention_map)
    assert out.attention_logits.shape == (2, 10)


def test_training_loss_is_both_cross_entropies_and_reaches_both_branches(abn):
    import copy

    from harness_plugins.models.abn import abn_loss

    model = copy.deepcopy(abn).train()  # batch statistics, as in fine-tuning
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3, 7, 0, 9])
    out = model.forward_branches(x)
    loss = abn_loss(out, y, label_smoothing=0.1)
    expected = F.cross_entropy(out.attention_logits, y, label_smoothing=0.1) + F.cross_entropy(out.logits, y, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    params = dict(model.named_parameters())
    for name in ("att_conv2.weight", "att_conv3.weight", "att_layer4.0.conv1.weight", "fc.weight",
                 "layer4.0.conv1.weight", "layer1.0.conv1.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_init_from_resnet_copies_trunk_and_stage4_into_the_attention_branch():
    import timm

    from harness_plugins.models.abn import ABNResNet, init_from_resnet

    resnet = timm.create_model("resnet50", num_classes=10)
    model = ABNResNet("resnet50", num_classes=10)
    left = init_from_resnet(model, resnet.state_dict())
    torch.testing.assert_close(model.att_layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)
    torch.testing.assert_close(model.layer4[0].downsample[0].weight, resnet.layer4[0].downsample[0].weight)
    torch.testing.assert_close(model.fc.weight, resnet.fc.weight)
    assert model.att_layer4[0].conv2.stride == (1, 1) and model.layer4[0].conv2.stride == (2, 2)
    assert set(left) >= {"att_conv.weight", "att_conv2.weight", "att_conv3.weight", "bn_att.weight"}
    assert not any(k.startswith(("layer", "conv1", "fc", "att_layer4")) for k in left)


def test_attributor_is_the_upsampled_map(abn):
    from harness_plugins.models.abn import ABNAttention

    loaded = wrap_module(abn, size=64, batch_size=3)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    maps = ABNAttention().attribute(loaded, x, torch.zeros(5, dtype=torch.long), [0] * 5)
    with torch.no_grad():
        m = abn.attention_map(x)
    assert maps.shape == (5, 64, 64)
    torch.testing.assert_close(maps, F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)[:, 0])
    assert maps.requires_grad is False and not maps.is_inference()


def test_attributor_refuses_a_model_without_attention_branch():
    from harness_plugins.models.abn import ABNAttention

    plain = wrap_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)), size=32)
    with pytest.raises(HarnessError, match="attributor 'abn' needs an Attention Branch Network.*constructed"):
        ABNAttention().attribute(plain, torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), [0])


def test_abn_attributor_in_an_insertion_run(cli, tmp_path):
    res = cli("run", "--model", "abn_resnet50", "--random-init", "--metric", "insertion", "--attributor", "abn",
              "--data", "samples", "--limit", "1", "-o", "metric.steps=4", "--out", tmp_path, "--quiet")
    assert res.exit_code == 0, res.stderr
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["attributor"]["id"] == "abn" and result["status"] == "ok"
    assert 0.0 <= result["value"] <= 1.0 and len(result["values"]["mean_curve"]) == 5
    res = cli("run", "--model", "efficientnet_lite0", "--metric", "insertion", "--attributor", "abn",
              "--data", "samples", "--limit", "1", "--out", tmp_path / "x", "--quiet")
    assert res.exit_code != 0 and "needs an Attention Branch Network" in res.stderr
