"""Spatial localisation (plugins/metrics/spatial_localisation.py): models whose tokens are their own input
patches (score 1) or a permutation of them (score 0), the batched HSIC matrix against a loop over pairs
with cka.py's scalar functions, streaming, resume / merge, the supported architectures and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from _rep_helpers import as_matrix, cli_result, image_folder, run_metric, smooth_images
from conftest import wrap_module

SIZE, CELL = 32, 8  # 4 x 4 grid of 3 x 8 x 8 input patches
GRID = SIZE // CELL


class Patches(nn.Module):
    """Tokens = the input cut into CELL x CELL patches (row-major), optionally permuted, with prefix tokens."""

    def __init__(self, perm: torch.Tensor | None = None, prefix: int = 0):
        super().__init__()
        self.perm = perm
        self.num_prefix_tokens = prefix
        self.tokens = nn.Identity()
        self.head = nn.Linear(3 * CELL * CELL, 5)

    def forward(self, x):
        b = x.shape[0]
        t = x.reshape(b, 3, GRID, CELL, GRID, CELL).permute(0, 2, 4, 1, 3, 5).reshape(b, GRID * GRID, -1)
        if self.perm is not None:
            t = t[:, self.perm]
        if self.num_prefix_tokens:
            t = torch.cat([t.mean(1, keepdim=True).expand(b, self.num_prefix_tokens, -1), t], 1)
        t = self.tokens(t)
        return self.head(t.mean(1))


class Unshuffled(nn.Module):
    """A feature map whose channels at (i, j) are the input patch (i, j) (pixel_unshuffle), NCHW or NHWC."""

    def __init__(self, channels_last: bool = False):
        super().__init__()
        self.output_fmt = "NHWC" if channels_last else "NCHW"
        self.stage = nn.Identity()
        self.head = nn.Linear(3 * CELL * CELL, 5)

    def forward(self, x):
        f = F.pixel_unshuffle(x, CELL)  # (B, 3*CELL*CELL, GRID, GRID), channels in another order
        f = self.stage(f.permute(0, 2, 3, 1) if self.output_fmt == "NHWC" else f)
        return self.head(f.flatten(1, 2).mean(1) if self.output_fmt == "NHWC" else f.mean((2, 3)))


class Conv(nn.Module):
    """A small random conv net: tanh(conv 8x8 stride 8) -> (B, 6, 4, 4) at 32 px."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, CELL, stride=CELL), nn.Tanh())
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _metric(**options):
    from harness_plugins.metrics.spatial_localisation import SpatialLocalisation

    return SpatialLocalisation(SpatialLocalisation.Options(**options))


@pytest.fixture(scope="module")
def images():
    return smooth_images(24, SIZE, seed=3)


def _chunks(records):
    return [r["values"]["chunk"] for r in records if r["values"].get("chunk")]


# -- hand-made models ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [Patches(), Patches(prefix=2), Unshuffled(), Unshuffled(channels_last=True)],
                         ids=["tokens", "prefix", "nchw", "nhwc"])
def test_tokens_that_are_their_own_patches_localise_perfectly(module, images, tmp_path):
    summary, records = run_metric(_metric(), [wrap_module(module, size=SIZE)], images, batch_size=8, out_dir=tmp_path)
    v = summary.values
    assert v["grid"] == [GRID, GRID] and v["cell_px"] == [CELL, CELL]
    assert v["prefix_tokens"] == getattr(module, "num_prefix_tokens", 0)
    assert summary.value == 1.0 and v["score"] == 1.0
    assert v["mean_distance_cells"] == 0.0 and v["mean_distance_px"] == 0.0
    assert v["peaks"] == list(range(GRID * GRID))
    cka = as_matrix(v["cka"])
    assert cka.shape == (GRID * GRID, GRID * GRID)
    assert torch.allclose(cka.diagonal(), torch.ones(GRID * GRID, dtype=torch.float64), atol=1e-9)
    assert v["own_cka"] == pytest.approx(1.0, abs=1e-9)
    assert v["chance"] == 1 / 16 and v["batches"] == 3 and v["images_used"] == 24
    assert summary.stderr == 0.0  # every leave-one-chunk-out estimate is 1
    assert (tmp_path / summary.artifacts["spatial_localisation"]).stat().st_size > 1000


def test_permuted_tokens_peak_at_the_permuted_position(images, tmp_path):
    perm = torch.roll(torch.arange(GRID * GRID), 5)  # a derangement: token p is input patch perm[p]
    summary, _ = run_metric(_metric(), [wrap_module(Patches(perm), size=SIZE)], images, batch_size=8, out_dir=tmp_path)
    v = summary.values
    assert summary.value == 0.0
    assert v["peaks"] == perm.tolist()
    pos = torch.arange(GRID * GRID)
    dy, dx = (perm // GRID - pos // GRID).double(), (perm % GRID - pos % GRID).double()
    assert v["mean_distance_cells"] == pytest.approx(float(torch.sqrt(dy**2 + dx**2).mean()), abs=1e-12)
    assert v["mean_distance_px"] == pytest.approx(CELL * v["mean_distance_cells"], abs=1e-12)
    cka = as_matrix(v["cka"])
    assert torch.allclose(cka[pos, perm], torch.ones(GRID * GRID, dtype=torch.float64), atol=1e-9)


def test_localisation_ties_and_undefined_rows():
    from harness_plugins.metrics.spatial_localisation import localisation

    cka = torch.tensor([[0.5, 0.5, 0.1, 0.0], [0.2, 0.9, 0.1, 0.0], [math.nan] * 4, [0.1, 0.8, math.nan, 0.3]],
                       dtype=torch.float64)
    out = localisation(cka, (2, 2), (10, 20))
    assert out["peaks"] == [0, 1, None, 1]  # a tie goes to the lowest index; an undefined row has no peak
    assert out["score"] == pytest.approx(2 / 3) and out["defined_tokens"] == 3
    # token 3 sits at (1, 1), its peak 1 at (0, 1): one row (10 px) away
    assert out["mean_distance_cells"] == pytest.approx(1 / 3)
    assert out["mean_distance_px"] == pytest.approx(10 / 3)


# -- the estimator ------------------------------------------------------------------------------------------
def _conv_activations(module: Conv, loaded, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Token (B, 16, 6) and input patch (B, 16, 192) representations, captured independently (float64)."""
    inputs = loaded.preprocess(images)
    with torch.inference_mode():
        fmap = module.features(inputs)
    tokens = fmap.permute(0, 2, 3, 1).reshape(len(images), GRID * GRID, -1).double()
    patches = inputs.reshape(len(images), 3, GRID, CELL, GRID, CELL).permute(0, 2, 4, 1, 3, 5)
    return tokens, patches.reshape(len(images), GRID * GRID, -1).double()


def _loop_hsic(tokens, patches, n):
    """sum over minibatches of HSIC_1 for every (p, q) pair, one pair at a time with cka.py's gram and u_centre."""
    from harness_plugins.metrics.cka import gram, u_centre

    p, q = tokens.shape[1], patches.shape[1]
    cross = torch.zeros(p, q, dtype=torch.float64)
    self_t, self_p = torch.zeros(p, dtype=torch.float64), torch.zeros(q, dtype=torch.float64)
    for b in range(tokens.shape[0] // n):
        sl = slice(b * n, (b + 1) * n)
        ks = [u_centre(gram(tokens[sl, i], torch.float64)) for i in range(p)]
        ls = [u_centre(gram(patches[sl, j], torch.float64)) for j in range(q)]
        for i in range(p):
            self_t[i] += (ks[i] * ks[i]).sum() / (n * (n - 3))
            for j in range(q):
                cross[i, j] += (ks[i] * ls[j]).sum() / (n * (n - 3))
        for j in range(q):
            self_p[j] += (ls[j] * ls[j]).sum() / (n * (n - 3))
    return cross, self_t, self_p


def test_batched_hsic_matrix_equals_a_loop_over_pairs(images, tmp_path):
    module = Conv()
    loaded = wrap_module(module, size=SIZE)
    summary, records = run_metric(_metric(gram_dtype="float64"), [loaded], images[:16], batch_size=8, out_dir=tmp_path)
    chunks = _chunks(records)
    assert len(chunks) == 2 and summary.values["layer"] == "features"
    tokens, patches = _conv_activations(module, loaded, images[:16])
    cross, self_t, self_p = _loop_hsic(tokens, patches, 8)
    ours = sum(torch.tensor(c["hsic_cross"], dtype=torch.float64) for c in chunks)
    assert torch.allclose(ours, cross, rtol=1e-9, atol=1e-9 * float(cross.abs().max()))
    assert torch.allclose(sum(torch.tensor(c["hsic_tokens"], dtype=torch.float64) for c in chunks), self_t, rtol=1e-9)
    assert torch.allclose(sum(torch.tensor(c["hsic_patches"], dtype=torch.float64) for c in chunks), self_p, rtol=1e-9)
    expected = cross / torch.sqrt(self_t[:, None] * self_p[None, :])
    assert torch.allclose(as_matrix(summary.values["cka"]), expected, atol=1e-10)
    # float32 grams (the default) agree closely
    fast, _ = run_metric(_metric(), [loaded], images[:16], batch_size=8, out_dir=tmp_path)
    assert torch.allclose(as_matrix(fast.values["cka"]), expected, atol=2e-5)
    # a random conv net's CKA with its own input patches is neither trivial nor perfect
    assert 0.05 < float(expected.diagonal().mean()) < 0.99


def test_streamed_minibatches_equal_one_chunk_of_the_same_minibatches(images, tmp_path):
    loaded = wrap_module(Conv(), size=SIZE)
    streamed, records = run_metric(_metric(), [loaded], images, batch_size=8, out_dir=tmp_path)
    assert len(_chunks(records)) == 3
    # one evaluate call with all 24 images: three minibatches of 8 in one chunk (one GEMM)
    metric = _metric(pool=3)
    assert metric.images_per_batch(8) == 24
    once, once_records = run_metric(metric, [loaded], images, batch_size=8, out_dir=tmp_path)
    (chunk,) = _chunks(once_records)
    assert chunk["batches"] == 3
    assert torch.allclose(as_matrix(once.values["cka"]), as_matrix(streamed.values["cka"]), atol=1e-6)
    assert once.values["peaks"] == streamed.values["peaks"] and once.value == streamed.value
    # the ratio of sums, not the mean of per-minibatch CKA
    tokens, patches = _conv_activations(Conv(), loaded, images)
    cross, self_t, self_p = _loop_hsic(tokens, patches, 24)
    one_batch = cross / torch.sqrt(self_t[:, None] * self_p[None, :])
    assert not torch.allclose(one_batch, as_matrix(streamed.values["cka"]), atol=1e-3)


def test_records_alone_determine_the_result(images, tmp_path):
    from harness.errors import HarnessError
    from harness.runner import MetricContext

    loaded = wrap_module(Conv(), size=SIZE)
    summary, records = run_metric(_metric(), [loaded], images, batch_size=8, out_dir=tmp_path)
    ctx = MetricContext(models=[loaded], attributor=None, masker=None, seed=0, batch_size=8, out_dir=tmp_path, run_id="m")
    merged = records[16:] + records[:16]  # the samples files of two processes, in any order
    again = _metric().summarize(merged, ctx)
    assert torch.allclose(as_matrix(again.values["cka"]), as_matrix(summary.values["cka"]), atol=1e-12)
    assert again.value == summary.value and again.stderr == pytest.approx(summary.stderr, abs=1e-12)
    mixed = [dict(r, values=dict(r["values"], minibatch=16)) if k == 0 else r for k, r in enumerate(records)]
    with pytest.raises(HarnessError, match="minibatch"):
        _metric().summarize(mixed, ctx)


def test_fewer_images_than_one_minibatch(images, tmp_path):
    from harness.errors import HarnessError

    loaded = wrap_module(Patches(), size=SIZE)
    summary, _ = run_metric(_metric(), [loaded], images[:6], batch_size=8, out_dir=tmp_path)
    assert summary.values["minibatch"] == 6 and "fewer than 8" in summary.values["note"] and summary.value == 1.0
    with pytest.raises(HarnessError, match="4 or more images"):
        run_metric(_metric(), [loaded], images[:3], batch_size=8, out_dir=tmp_path)


# -- architectures ------------------------------------------------------------------------------------------
SWIN = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1))


@pytest.mark.parametrize(("name", "kwargs", "size", "layer", "grid", "cell", "prefix"), [
    ("test_vit", {}, 160, "blocks.5", 10, 16, 1),
    ("test_vit", dict(global_pool="avg", class_token=False), 160, "blocks.5", 10, 16, 0),
    ("test_vit", dict(reg_tokens=2), 160, "blocks.5", 10, 16, 3),
    ("test_resnet", {}, 160, "layer4.0", 5, 32, 0),
    ("test_convnext", {}, 160, "stages.3.blocks.1", 5, 32, 0),
    ("swin_tiny_patch4_window7_224", SWIN, 224, "layers.3.blocks.0", 7, 32, 0),
], ids=["vit_cls", "vit_gap", "vit_registers", "resnet", "convnext", "swin"])
def test_architectures_default_layer_and_grid(name, kwargs, size, layer, grid, cell, prefix, tmp_path):
    torch.manual_seed(0)
    loaded = wrap_module(timm.create_model(name, pretrained=False, **kwargs), size=size)
    summary, _ = run_metric(_metric(), [loaded], smooth_images(8, size, seed=2), batch_size=8, out_dir=tmp_path)
    v = summary.values
    assert (v["layer"], v["grid"], v["cell_px"], v["prefix_tokens"]) == (layer, [grid, grid], [cell, cell], prefix)
    assert as_matrix(v["cka"]).shape == (grid * grid, grid * grid)
    assert 0 <= summary.value <= 1 and math.isfinite(v["mean_distance_px"])


def test_another_layer_by_name(tmp_path):
    loaded = wrap_module(timm.create_model("test_vit", pretrained=False), size=160)
    summary, _ = run_metric(_metric(layer="blocks.2.norm2:in"), [loaded], smooth_images(8, 160, seed=2), batch_size=8,
                            out_dir=tmp_path)
    assert summary.values["layer"] == "blocks.2.norm2:in" and summary.values["grid"] == [10, 10]


@pytest.mark.parametrize(("module", "options", "message"), [
    (Conv(), {"layer": "head"}, "needs tokens"),
    (Conv(), {"layer": "features.*"}, "compares one layer"),
    (nn.Sequential(nn.AdaptiveAvgPool2d(5), nn.Flatten(2)), {"layer": "0"}, "does not split evenly"),
    (Patches(), {"layer": "nothing"}, "matches no module"),
])
def test_unsupported_layers_raise_one_line(module, options, message, images, tmp_path):
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match=message) as info:
        run_metric(_metric(**options), [wrap_module(module, size=SIZE)], images[:8], batch_size=8, out_dir=tmp_path)
    assert "\n" not in str(info.value)


# -- CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("spatial_images"), 16, size=64)


@pytest.mark.parametrize(("model", "grid"), [("test_vit", 10), ("test_resnet", 5)])
def test_cli_end_to_end_and_plot(cli, folder, tmp_path, model, grid):
    res = cli("run", "--model", model, "--random-init", "--metric", "spatial_localisation", "--data", f"folder:{folder}",
              "--batch-size", "8", "--out", tmp_path, "--quiet")
    path, result = cli_result(res)
    values = result["values"]
    assert values["grid"] == [grid, grid] and values["batches"] == 2 and values["minibatch"] == 8
    assert len(values["cka"]) == grid * grid and result["value"] == values["score"]
    assert result["metric"]["higher_is_better"] is True
    png = tmp_path / result["artifacts"]["spatial_localisation"]
    assert png.exists() and png.stat().st_size > 1000
    png.unlink()
    assert cli("plot", path).exit_code == 0 and png.exists()


def test_cli_resume_gives_the_uninterrupted_numbers(cli, folder, tmp_path):
    args = ["run", "--model", "test_resnet", "--random-init", "--metric", "spatial_localisation",
            "--data", f"folder:{folder}", "--batch-size", "4", "--quiet"]
    _, full = cli_result(cli(*args, "--out", tmp_path / "full"))
    lines = (tmp_path / "full" / f"{full['run_id']}.samples.jsonl").read_text().splitlines(keepends=True)
    target = tmp_path / "resumed"
    target.mkdir()
    (target / f"{full['run_id']}.samples.jsonl").write_text("".join(lines[:8]))  # the first two chunks
    _, resumed = cli_result(cli(*args, "--out", target, "--resume"))
    assert resumed["values"]["cka"] == full["values"]["cka"]
    assert resumed["value"] == full["value"] and resumed["stderr"] == full["stderr"] and resumed["values"]["batches"] == 4


@pytest.mark.parametrize(("option", "message"), [
    ("metric.layer=blocks.*", "compares one layer"),
    ("metric.layer=head", "needs tokens"),
    ("metric.minibatch=2", "minibatch"),
    ("metric.layout=sideways", "layout"),
])
def test_cli_bad_options_give_one_line(cli, tmp_path, option, message):
    res = cli("run", "--model", "test_vit", "--random-init", "--metric", "spatial_localisation", "--limit", "4",
              "--batch-size", "4", "-o", option, "--out", tmp_path, "--quiet")
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_list_layers_shows_the_default(cli):
    res = cli("list", "layers", "--model", "test_resnet", "--random-init", "--json")
    assert res.exit_code == 0, res.stderr
    rows = {r["layer"]: r for r in json.loads(res.stdout)}
    assert "spatial_localisation" in rows["layer4.0"]["default_for"]
    assert "spatial_localisation" not in rows["layer3.0"]["default_for"]
