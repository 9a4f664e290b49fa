"""Further analyses of seed 001: skip-connection norm ratio (norm_ratio) and effective receptive
fields (erf), checked against recomputations on the same activations and hand-built models with
known answers, plus CLI runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from _rep_helpers import image_folder, run_metric, smooth_images
from conftest import wrap_module


# -- norm_ratio -------------------------------------------------------------------------------------------
def _norm_ratio():
    from harness_plugins.metrics.norm_ratio import NormRatio

    return NormRatio()


def test_norm_ratio_matches_a_recomputation_on_a_timm_vit(tmp_path):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("test_vit").eval()
    loaded = wrap_module(vit, size=160)
    images = smooth_images(3, 160, seed=1)
    summary, _ = run_metric(_norm_ratio(), [loaded], images, batch_size=2, out_dir=tmp_path)
    names = summary.values["branches"]
    assert names[:2] == ["blocks.0.attn", "blocks.0.mlp"] and len(names) == 2 * len(vit.blocks)

    z_in, f_out = {}, {}
    handles = []
    for i, block in enumerate(vit.blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: z_in.__setitem__((i, "attn"), a[0].clone())))
        handles.append(block.norm2.register_forward_pre_hook(lambda m, a, i=i: z_in.__setitem__((i, "mlp"), a[0].clone())))
        handles.append(block.drop_path1.register_forward_hook(lambda m, a, o, i=i: f_out.__setitem__((i, "attn"), o.clone())))
        handles.append(block.drop_path2.register_forward_hook(lambda m, a, o, i=i: f_out.__setitem__((i, "mlp"), o.clone())))
    with torch.inference_mode():
        vit(loaded.preprocess(images))
    for h in handles:
        h.remove()
    for k, name in enumerate(names):
        i, kind = int(name.split(".")[1]), name.split(".")[2]
        ratio = z_in[(i, kind)].norm(dim=-1) / f_out[(i, kind)].norm(dim=-1)  # (B, tokens)
        assert summary.values["patch"][k] == pytest.approx(float(ratio[:, 1:].mean(1).mean()), rel=1e-5)
        assert summary.values["prefix"][k] == pytest.approx(float(ratio[:, 0].mean()), rel=1e-5)
    assert len(summary.values["per_token"]) == len(names) and len(summary.values["per_token"][0]) == 101
    assert summary.value == pytest.approx(sum(summary.values["patch"]) / len(names), rel=1e-9)


def test_norm_ratio_resnet_zero_branch_is_undefined_then_matches(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("test_resnet").eval()  # timm zero-initialises the last BN of every block
    loaded = wrap_module(net, size=64)
    images = smooth_images(2, 64, seed=2)
    summary, _ = run_metric(_norm_ratio(), [loaded], images, batch_size=2, out_dir=tmp_path)
    assert all(v is None for v in summary.values["patch"]) and math.isnan(summary.value)
    assert summary.values["undefined"] and "zero norm" in summary.values["undefined"][0]["reason"]

    with torch.no_grad():
        for name, m in net.named_modules():
            if name.endswith(("bn2", "bn3")):
                m.weight.fill_(0.5)
    summary, _ = run_metric(_norm_ratio(), [loaded], images, batch_size=2, out_dir=tmp_path)
    names = summary.values["branches"]
    assert names == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"] and summary.values["prefix"] is None
    block = net.layer2[0]  # a BasicBlock with a downsample: z = downsample(x), f = bn2 output
    seen = {}
    hs = [block.downsample.register_forward_hook(lambda m, a, o: seen.__setitem__("z", o.clone())),
          block.bn2.register_forward_hook(lambda m, a, o: seen.__setitem__("f", o.clone()))]
    with torch.inference_mode():
        net(loaded.preprocess(images))
    for h in hs:
        h.remove()
    ratio = seen["z"].norm(dim=1) / seen["f"].norm(dim=1)  # per spatial position
    assert summary.values["patch"][1] == pytest.approx(float(ratio.flatten(1).mean(1).mean()), rel=1e-5)


# -- erf --------------------------------------------------------------------------------------------------
class OnesConv(nn.Module):
    """Two stacked 3x3 convolutions with all-one weights: ERFs of 3x3 and 5x5 (triangular) pixels."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.second = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        nn.init.ones_(self.first.weight)
        nn.init.ones_(self.second.weight)

    def forward(self, x):
        return self.second(self.first(x)).mean((2, 3))


def test_erf_radius_of_known_receptive_fields(tmp_path):
    from harness_plugins.metrics.erf import ERF

    loaded = wrap_module(OnesConv(), size=32)
    metric = ERF(ERF.Options(layers="first,second", map_size=32))
    summary, _ = run_metric(metric, [loaded], smooth_images(3, 32), batch_size=2, out_dir=tmp_path)
    assert summary.values["layers"] == ["first", "second"]
    first, second = summary.values["radius_px"]
    assert first == pytest.approx(math.sqrt(4 / 3), rel=1e-6)  # uniform 3x3: E[dy^2 + dx^2] = 2 * 2/3
    assert second == pytest.approx(math.sqrt(8 / 3), rel=1e-6)  # weights 1,2,3,2,1 per axis: 2 * 4/3
    maps = torch.tensor(summary.values["maps"])
    assert maps.shape == (2, 32, 32) and torch.allclose(maps.sum((1, 2)), torch.ones(2), atol=1e-6)
    assert (maps[0] > 0).sum() == 9 and (maps[1] > 0).sum() == 25
    assert summary.values["centre_px"][0] == [16.5, 16.5]
    assert summary.values["radius_px_of_mean_map"] == pytest.approx([first, second], rel=1e-6)
    assert summary.value == pytest.approx((first + second) / 2, rel=1e-9)


def test_erf_vit_tokens_central_patch(tmp_path):
    import timm

    from harness_plugins.metrics.erf import ERF

    torch.manual_seed(0)
    vit = timm.create_model("test_vit").eval()
    loaded = wrap_module(vit, size=160)
    metric = ERF(ERF.Options(map_size=16))
    summary, _ = run_metric(metric, [loaded], smooth_images(2, 160), batch_size=2, out_dir=tmp_path)
    assert summary.values["layers"] == ["blocks.1", "blocks.2", "blocks.4", "blocks.5"]  # quarter depths of 6
    assert summary.values["centre_px"][0] == [88.0, 88.0]  # patch (5, 5) of the 10 x 10 grid of 16 px
    assert all(r is not None and 0 < r < 160 for r in summary.values["radius_px"])
    # the input patch of the central token itself carries gradient (residual stream)
    patch = torch.tensor(summary.values["maps"][0])[8:9, 8:9]
    assert float(patch.sum()) > 0


# -- CLI --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("probe_images"), 2, size=64)


@pytest.mark.parametrize("metric,artifact", [("norm_ratio", "norm_ratio"), ("erf", "erf")])
def test_cli_runs_on_test_vit(cli, folder, tmp_path, metric, artifact):
    res = cli("run", "--model", "test_vit", "--random-init", "--metric", metric, "--data", f"folder:{folder}",
              "--batch-size", "2", "--out", tmp_path, "--quiet", *(["-o", "metric.map_size=16"] if metric == "erf" else []))
    assert res.exit_code == 0, res.stderr
    path = res.stdout.strip().rsplit("-> ", 1)[1]
    result = json.loads(open(path).read())
    assert math.isfinite(result["value"]) and result["metric"]["higher_is_better"] is None
    png = tmp_path / result["artifacts"][artifact]
    assert png.exists()
    png.unlink()
    from conftest import run_cli

    assert run_cli("plot", path).exit_code == 0 and png.exists()
