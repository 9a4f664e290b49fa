"""Minibatch CKA (plugins/metrics/cka.py): the estimator against an independent float64 reference on the
same activations, its invariances, undefined values, repeats, resume, and the CLI (self and cross)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from _rep_helpers import as_matrix, cli_result, image_folder, run_metric, smooth_images
from conftest import wrap_module

LAYERS = ["base", "ortho", "scaled", "linear", "offset", "other"]


class Fixed(nn.Module):
    """x @ matrix (+ offset): a fixed linear map of the features."""

    def __init__(self, matrix: torch.Tensor, offset: float = 0.0):
        super().__init__()
        self.register_buffer("matrix", matrix.float())
        self.offset = offset

    def forward(self, x):
        return x @ self.matrix + self.offset


class Branches(nn.Module):
    """Features f (12-d) and transforms of f, each a separately hooked module run once per forward."""

    def __init__(self, seed: int = 0, zero: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.base = nn.Sequential(nn.Conv2d(3, 3, 5, stride=4), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
        spread = torch.randn(12, 12, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, 2, 12, dtype=torch.float64))
        self.ortho = Fixed(q)
        self.scaled = Fixed(3.7 * torch.eye(12))
        self.linear = Fixed(spread)
        self.offset = Fixed(torch.eye(12), offset=1e3)
        self.other = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 6))
        self.zero = Fixed(torch.zeros(12, 12)) if zero else None
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        f = self.base(x)
        for m in (self.ortho, self.scaled, self.linear, self.offset, self.other, self.zero):
            if m is not None:
                m(f)
        return self.head(f)


def _metric(**options):
    from harness_plugins.metrics.cka import CKA

    return CKA(CKA.Options(**{"layers": LAYERS, **options}))


def _activations(module: nn.Module, loaded, images, names) -> dict[str, torch.Tensor]:
    """The same activations the metric sees, captured by the test's own hooks (float64, flattened)."""
    out: dict[str, torch.Tensor] = {}
    handles = [module.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: out.__setitem__(n, o.detach())) for n in names]
    with torch.inference_mode():
        module(loaded.preprocess(images))
    for h in handles:
        h.remove()
    return {n: t.reshape(t.shape[0], -1).double() for n, t in out.items()}


def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 as written in METHODS.md section 9 (Song et al. 2012), float64."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64)
    value = torch.trace(k @ l) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one.T @ k @ l @ one)
    return value.squeeze() / (n * (n - 3))


def reference_cka(acts: dict[str, torch.Tensor], names: list[str], n: int) -> torch.Tensor:
    """Minibatch CKA: sum of HSIC_1 over consecutive batches of n (partial batch dropped), ratio at the end."""
    total = next(iter(acts.values())).shape[0]
    nb = total // n
    def centred(x):  # exact in float64; keeps the explicit formula's 1'K1 terms from cancelling catastrophically
        return x - x.mean(0, keepdim=True)

    grams = {k: [centred(acts[k][b * n : (b + 1) * n]) @ centred(acts[k][b * n : (b + 1) * n]).T for b in range(nb)] for k in names}
    s = torch.zeros(len(names), len(names), dtype=torch.float64)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            s[i, j] = sum(hsic1(grams[a][t], grams[b][t]) for t in range(nb))
    d = s.diagonal()
    return s / torch.sqrt(d[:, None] * d[None, :])


def mean_of_batch_cka(acts, a: str, b: str, n: int) -> float:
    """The wrong estimator (mean of per-batch CKA), to show the data tell the two apart."""
    total = acts[a].shape[0]
    vals = []
    for t in range(total // n):
        xa, xb = acts[a][t * n : (t + 1) * n], acts[b][t * n : (t + 1) * n]
        ka = (xa - xa.mean(0)) @ (xa - xa.mean(0)).T
        kb = (xb - xb.mean(0)) @ (xb - xb.mean(0)).T
        vals.append(float(hsic1(ka, kb) / torch.sqrt(hsic1(ka, ka) * hsic1(kb, kb))))
    return sum(vals) / len(vals)


@pytest.fixture(scope="module")
def setup():
    module = Branches()
    loaded = wrap_module(module, size=32)
    # contrast differs per batch of 16, so the ratio of sums and the mean of per-batch CKA differ
    contrast = [0.3] * 16 + [1.0] * 16 + [2.5] * 16 + [0.6] * 16 + [1.0] * 6
    images = smooth_images(70, 32, seed=1, contrast=contrast)
    acts = _activations(module, loaded, images, LAYERS)
    return module, loaded, images, acts


def test_u_centred_inner_product_is_methods_hsic1():
    from harness_plugins.metrics.cka import u_centre

    torch.manual_seed(0)
    x = torch.randn(11, 7, dtype=torch.float64)
    y = torch.randn(11, 5, dtype=torch.float64) + x[:, :5]
    k, l = x @ x.T, y @ y.T
    ours = (u_centre(k) * u_centre(l)).sum() / (11 * 8)
    assert float(ours) == pytest.approx(float(hsic1(k, l)), rel=1e-10)


def test_minibatch_matches_float64_reference_on_the_same_activations(setup, tmp_path):
    module, loaded, images, acts = setup
    summary, records = run_metric(_metric(), [loaded], images, batch_size=16, out_dir=tmp_path)
    ours = as_matrix(summary.values["cka"])
    ref = reference_cka(acts, LAYERS, 16)
    assert summary.values["layers_a"] == LAYERS
    assert torch.allclose(ours, ref, atol=2e-5), (ours - ref).abs().max()
    # the last partial batch (6 images) contributes nothing
    assert summary.values["batches"] == 4 and summary.values["images_used"] == 64
    assert summary.values["images_dropped"] == 6 and summary.values["note"] is None
    assert sum(r["values"]["in_batch"] for r in records) == 64
    # ratio of sums, not the mean of per-batch CKA: the data make the two differ
    i, j = LAYERS.index("base"), LAYERS.index("other")
    assert abs(mean_of_batch_cka(acts, "base", "other", 16) - float(ref[i, j])) > 1e-3


def test_minibatch_estimate_agrees_with_full_batch_on_iid_images(tmp_path):
    """On i.i.d. images the minibatch estimate (3 batches of 32) is close to the float64 full-batch unbiased CKA."""
    module = Branches()
    loaded = wrap_module(module, size=32)
    images = smooth_images(96, 32, seed=5)
    acts = _activations(module, loaded, images, LAYERS)
    summary, _ = run_metric(_metric(), [loaded], images, batch_size=32, out_dir=tmp_path)
    ours = as_matrix(summary.values["cka"])
    full = reference_cka(acts, LAYERS, 96)
    assert torch.allclose(ours, full, atol=0.05), (ours - full).abs().max()
    assert torch.allclose(ours, reference_cka(acts, LAYERS, 32), atol=2e-5)


def test_single_batch_equals_full_batch_unbiased_cka(setup, tmp_path):
    module, loaded, images, acts = setup
    summary, _ = run_metric(_metric(minibatch=64, gram_dtype="float64"), [loaded], images[:64], batch_size=8, out_dir=tmp_path)
    ref = reference_cka({k: v[:64] for k, v in acts.items()}, LAYERS, 64)
    assert torch.allclose(as_matrix(summary.values["cka"]), ref, atol=1e-8)


@pytest.mark.parametrize("gram_dtype", ["float32", "float64"])
def test_diagonal_invariances_and_offset(setup, tmp_path, gram_dtype):
    module, loaded, images, acts = setup
    summary, _ = run_metric(_metric(gram_dtype=gram_dtype), [loaded], images, batch_size=16, out_dir=tmp_path)
    cka = as_matrix(summary.values["cka"])
    at = {n: i for i, n in enumerate(LAYERS)}
    assert torch.allclose(cka.diagonal(), torch.ones(len(LAYERS), dtype=torch.float64), atol=1e-9)
    assert torch.allclose(cka, cka.T, atol=1e-9)
    assert cka[at["base"], at["ortho"]] == pytest.approx(1.0, abs=1e-5)  # orthogonal transform
    assert cka[at["base"], at["scaled"]] == pytest.approx(1.0, abs=1e-5)  # isotropic scaling
    assert cka[at["base"], at["linear"]] < 0.95  # an arbitrary invertible linear map changes it
    # a constant offset of 1e3 on every feature changes nothing (float32 activations quantise at ~6e-5)
    assert cka[at["base"], at["offset"]] == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(cka[at["offset"]], cka[at["base"]], atol=1e-4)
    # the headline is the mean off-diagonal CKA
    off = cka[~torch.eye(len(LAYERS), dtype=torch.bool)]
    assert summary.value == pytest.approx(float(off.mean()), abs=1e-12)
    assert summary.stderr is not None and summary.stderr >= 0


def test_offset_without_mean_subtraction_would_fail(setup):
    """Guard: the offset test has teeth (float32 grams of uncentred features lose the signal)."""
    _, _, _, acts = setup
    from harness_plugins.metrics.cka import u_centre

    x = acts["base"][:16].float()
    y = (acts["base"][:16] + 1e3).float()
    naive = [u_centre((t @ t.T).double()) for t in (x, y)]
    cka = (naive[0] * naive[1]).sum() / torch.sqrt((naive[0] ** 2).sum() * (naive[1] ** 2).sum())
    assert abs(float(cka) - 1.0) > 1e-3


def test_undefined_layer_is_reported_not_clamped(tmp_path):
    module = Branches(zero=True)
    loaded = wrap_module(module, size=32)
    metric = _metric(layers=["base", "zero", "ortho"])
    summary, _ = run_metric(metric, [loaded], smooth_images(32, 32, seed=2), batch_size=16, out_dir=tmp_path)
    assert summary.values["layers_a"] == ["base", "ortho", "zero"]  # execution order
    cka = as_matrix(summary.values["cka"])
    assert cka[2].isnan().all() and cka[:, 2].isnan().all()  # NaN (null in the result file), not clamped
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-5)
    (entry,) = summary.values["undefined"]
    assert entry["layer"] == "zero" and "undefined" in entry["reason"]
    assert math.isfinite(summary.value)


def test_repeats_reshuffle_within_pools_and_repeat_zero_is_the_plain_estimate(setup, tmp_path):
    module, loaded, images, acts = setup
    plain, plain_records = run_metric(_metric(), [loaded], images[:64], batch_size=16, out_dir=tmp_path)
    metric = _metric(repeats=3, pool=2)
    assert metric.images_per_batch(16) == 32
    summary, records = run_metric(metric, [loaded], images[:64], batch_size=16, out_dir=tmp_path)
    chunks = [r["values"]["chunk"] for r in records if r["values"].get("chunk")]
    assert len(chunks) == 2 and all(len(c["hsic_pairs"][0]) == 3 for c in chunks)
    rep0 = sum(torch.tensor(c["hsic_pairs"][0][0], dtype=torch.float64) for c in chunks)
    base = sum(torch.tensor(c["hsic_pairs"][0][0], dtype=torch.float64) for c in (r["values"]["chunk"] for r in plain_records if r["values"].get("chunk")))
    assert torch.allclose(rep0, base, rtol=1e-6, atol=1e-6 * float(base.abs().max()))
    rep1 = sum(torch.tensor(c["hsic_pairs"][0][1], dtype=torch.float64) for c in chunks)
    assert not torch.allclose(rep0, rep1, rtol=1e-6)  # a different batching
    cka = as_matrix(summary.values["cka"])
    assert torch.allclose(cka.diagonal(), torch.ones(len(LAYERS), dtype=torch.float64), atol=1e-9)
    assert "cka_std" in summary.values
    # the same seed gives the same numbers
    again, _ = run_metric(_metric(repeats=3, pool=2), [loaded], images[:64], batch_size=16, out_dir=tmp_path)
    assert again.values["cka"] == summary.values["cka"]


def test_records_alone_determine_the_result(setup, tmp_path):
    """Summaries from records split across 'processes' (any order) equal the single-run summary."""
    module, loaded, images, acts = setup
    summary, records = run_metric(_metric(), [loaded], images, batch_size=16, out_dir=tmp_path)
    merged = records[32:] + records[:32]
    from harness.runner import MetricContext

    ctx = MetricContext(models=[loaded], attributor=None, masker=None, seed=0, batch_size=16, out_dir=tmp_path, run_id="m")
    again = _metric().summarize(merged, ctx)
    assert torch.allclose(as_matrix(again.values["cka"]), as_matrix(summary.values["cka"]), atol=1e-12)
    mixed = [dict(r, values=dict(r["values"], minibatch=8)) if k == 0 else r for k, r in enumerate(records)]
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="minibatch"):
        _metric().summarize(mixed, ctx)


def test_cross_model_heatmap(tmp_path):
    a, b = Branches(seed=0), Branches(seed=0)
    b.load_state_dict(a.state_dict())
    la, lb = wrap_module(a, size=32, model_id="a"), wrap_module(b, size=32, model_id="b")
    from harness_plugins.metrics.cka import CKA

    metric = CKA(CKA.Options(layers=["base", "linear"], layers_b=["other", "base", "scaled"]))
    summary, _ = run_metric(metric, [la, lb], smooth_images(48, 32, seed=3), batch_size=16, out_dir=tmp_path)
    cka = as_matrix(summary.values["cka"])
    assert cka.shape == (2, 3)
    assert summary.values["layers_b"] == ["base", "scaled", "other"]  # execution order
    assert cka[0, 0] == pytest.approx(1.0, abs=1e-6) and cka[0, 1] == pytest.approx(1.0, abs=1e-5)
    # headline: mean over A's layers of the best B match
    assert summary.value == pytest.approx(float(cka.max(1).values.mean()), abs=1e-12)
    assert (tmp_path / summary.artifacts["cka"]).exists()


def test_fewer_images_than_one_minibatch(tmp_path):
    """All the data smaller than one minibatch: one minibatch of its own size (noted); under 4: an error."""
    from harness.errors import HarnessError

    module = Branches()
    loaded = wrap_module(module, size=32)
    images = smooth_images(10, 32, seed=6)
    summary, _ = run_metric(_metric(), [loaded], images, batch_size=16, out_dir=tmp_path)
    assert summary.values["minibatch"] == 10 and summary.values["batches"] == 1 and "fewer than 16" in summary.values["note"]
    acts = _activations(module, loaded, images, LAYERS)
    assert torch.allclose(as_matrix(summary.values["cka"]), reference_cka(acts, LAYERS, 10), atol=2e-5)
    with pytest.raises(HarnessError, match="4 or more images"):
        run_metric(_metric(), [loaded], smooth_images(3, 32), batch_size=16, out_dir=tmp_path)


# -- CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("cka_images"), 24, size=64)


def test_cli_self_similarity_test_vit(cli, folder, tmp_path):
    res = cli("run", "--model", "test_vit", "--random-init", "--metric", "cka", "--data", f"folder:{folder}",
              "--batch-size", "8", "--out", tmp_path, "--quiet")
    path, result = cli_result(res)
    values = result["values"]
    layers = values["layers_a"]
    assert len(layers) == 36 and layers[:6] == ["blocks.0.norm1", "blocks.0.attn", "blocks.0.norm2:in", "blocks.0.norm2", "blocks.0.mlp.act", "blocks.0"]
    cka = as_matrix(values["cka"])
    assert cka.shape == (36, 36)
    assert torch.allclose(cka.diagonal(), torch.ones(36, dtype=torch.float64), atol=1e-9)
    assert values["batches"] == 3 and values["minibatch"] == 8
    assert result["metric"]["higher_is_better"] is None
    png = tmp_path / result["artifacts"]["cka"]
    assert png.exists() and png.stat().st_size > 1000
    # `harness plot` redraws it
    png.unlink()
    assert cli("plot", path).exit_code == 0 and png.exists()


def test_cli_cross_model_and_globs(cli, folder, tmp_path):
    res = cli("run", "--model", "test_vit", "--model", "test_resnet", "--random-init", "--metric", "cka",
              "--data", f"folder:{folder}", "--batch-size", "8", "--limit", "16", "-o", "metric.layers=blocks.*",
              "-o", "metric.layers_b=layer?.*,layer4.*.act1", "--out", tmp_path, "--quiet")
    _, result = cli_result(res)
    values = result["values"]
    assert values["layers_a"] == [f"blocks.{i}" for i in range(6)]
    assert values["layers_b"][-2:] == ["layer4.0.act1", "layer4.0"]
    assert as_matrix(values["cka"]).shape == (6, len(values["layers_b"]))
    assert [m["id"] for m in result["models"]] == ["test_vit", "test_resnet"]


def test_cli_cka_cross_all_pairs(cli, folder, tmp_path):
    res = cli("run", "--model", "test_vit", "--model", "test_resnet", "--model", "test_vit", "--random-init",
              "--metric", "cka_cross", "--data", f"folder:{folder}", "--batch-size", "8", "--limit", "8",
              "-o", "metric.layers=blocks", "--out", tmp_path, "--quiet")
    _, result = cli_result(res)
    pairs = result["values"]["pairs"]
    assert [(p["a"], p["b"]) for p in pairs] == [("test_vit", "test_resnet"), ("test_vit", "test_vit"), ("test_resnet", "test_vit")]
    same = as_matrix(pairs[1]["cka"])  # the same random-init weights (same seed): diagonal 1
    assert torch.allclose(same.diagonal(), torch.ones(6, dtype=torch.float64), atol=1e-6)
    assert len(result["artifacts"]) == 3


def test_cli_resume_gives_the_uninterrupted_numbers(cli, folder, tmp_path):
    args = ["run", "--model", "test_vit", "--random-init", "--metric", "cka", "--data", f"folder:{folder}",
            "--batch-size", "8", "-o", "metric.layers=blocks", "--quiet"]
    _, full = cli_result(cli(*args, "--out", tmp_path / "full"))
    # an interrupted run: only the first chunk (8 records, carrying its HSIC sums) reached the samples file
    lines = (tmp_path / "full" / f"{full['run_id']}.samples.jsonl").read_text().splitlines(keepends=True)
    target = tmp_path / "resumed"
    target.mkdir()
    (target / f"{full['run_id']}.samples.jsonl").write_text("".join(lines[:8]))
    _, resumed = cli_result(cli(*args, "--out", target, "--resume"))
    assert resumed["values"]["cka"] == full["values"]["cka"]
    assert resumed["value"] == full["value"] and resumed["values"]["batches"] == 3


def test_cli_bad_layer_pattern_and_list_layers(cli, tmp_path):
    res = cli("run", "--model", "test_vit", "--random-init", "--metric", "cka", "--limit", "4", "--batch-size", "4",
              "-o", "metric.layers=nothing.*", "--out", tmp_path, "--quiet")
    assert res.exit_code == 2
    assert "matches no module" in res.stderr and "harness list layers --model test_vit" in res.stderr
    res = cli("list", "layers", "--model", "test_vit", "--random-init", "--json")
    assert res.exit_code == 0, res.stderr
    rows = {r["layer"]: r for r in json.loads(res.stdout)}
    assert "cka" in rows["blocks.0.norm2:in"]["default_for"]
    assert rows["blocks.0.mlp.act"]["shape"] == [101, 192]
    assert "cka" not in rows["blocks.0.attn.qkv"]["default_for"]
    text = cli("list", "layers", "--model", "test_resnet", "--random-init")
    assert text.exit_code == 0 and "layer1.0.act1" in text.stdout
    assert cli("list", "layers").exit_code == 2
