"""ROAD's noisy linear imputation masker (plugins/maskers/road.py) and the sweep's fill hook.

(a) hand cases: one removed pixel is the weighted mean of its neighbours; two coupled pixels;
(b) both solvers equal an independent dense solve of ROAD's equations written out pixel by pixel;
(c) noise: size, placement, seeding independent of chunking; the fully removed image;
(d) the sweep and the MoRF/deletion metrics impute every composite (against a per-row reference);
(e) option and mask errors are one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import Batch, Sample
from harness.errors import HarnessError
from harness.options import build_options
from harness.regions import Granularity, ranks
from harness.runner import MetricContext
from harness.sweep import perturbation_curves, step_counts
from harness_plugins.maskers import road
from harness_plugins.maskers.road import NoisyLinearImputation, RoadOptions
from harness_plugins.metrics.insertion_deletion import Deletion
from harness_plugins.metrics.region_perturbation import MoRF

from conftest import wrap_module

SOLVERS = ["multigrid", "direct"]


def _dense_reference(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """ROAD's equations written out pixel by pixel, solved with a dense matrix. image (C, H, W), keep (H, W)."""
    channels, height, width = image.shape
    unknown = [(r, c) for r in range(height) for c in range(width) if not keep[r, c]]
    index = {p: i for i, p in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), channels))
    for (r, c), i in index.items():
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if (dr, dc) == (0, 0) or not (0 <= rr < height and 0 <= cc < width):
                    continue
                w = 1 / 12 if dr and dc else 1 / 6
                a[i, i] += w
                if keep[rr, cc]:
                    b[i] += w * image[:, rr, cc]
                else:
                    a[i, index[(rr, cc)]] -= w
    out = image.copy()
    if unknown:
        solution = np.linalg.solve(a, b)
        for (r, c), i in index.items():
            out[:, r, c] = solution[i]
    return out


def _model(size: int = 16, std: float = 1.0):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten(), torch.nn.Linear(4, 5))
    model = wrap_module(module, size=size, batch_size=4)
    model.data_config["std"] = (std, std, std)
    return model


def _masker(**options) -> NoisyLinearImputation:
    return NoisyLinearImputation(RoadOptions(**options))


# -- (a) hand cases ------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_one_removed_pixel_is_the_weighted_mean_of_its_neighbours(solver):
    image = torch.arange(48, dtype=torch.float64).view(1, 3, 4, 4) ** 1.5 / 10
    for (r, c) in ((1, 2), (0, 0), (3, 1)):
        keep = torch.ones(1, 1, 4, 4, dtype=torch.float64)
        keep[0, 0, r, c] = 0
        out = _masker(noise=0.0, solver=solver, tolerance=1e-12).impute(_model(4), image, keep, [0])
        weights, total = torch.zeros(3, dtype=torch.float64), 0.0
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr, dc) != (0, 0) and 0 <= r + dr < 4 and 0 <= c + dc < 4:
                    w = 1 / 12 if dr and dc else 1 / 6
                    weights += w * image[0, :, r + dr, c + dc]
                    total += w
        assert total == pytest.approx(1.0 if (r, c) == (1, 2) else {(0, 0): 5 / 12, (3, 1): 2 / 3}[(r, c)])
        torch.testing.assert_close(out[0, :, r, c], weights / total, rtol=0, atol=1e-10)
        unchanged = keep[0, 0].bool()
        assert torch.equal(out[0][:, unchanged], image[0][:, unchanged])


@pytest.mark.parametrize("solver", SOLVERS)
def test_two_adjacent_removed_pixels_solve_their_coupled_equations(solver):
    image = torch.rand(1, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    keep = torch.ones(1, 1, 5, 5, dtype=torch.float64)
    keep[0, 0, 2, 1] = keep[0, 0, 2, 2] = 0  # a and b, horizontal neighbours in the interior

    def known_sum(r, c):  # weighted sum over the known neighbours
        s = torch.zeros(3, dtype=torch.float64)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr, dc) != (0, 0) and keep[0, 0, r + dr, c + dc] == 1:
                    s += (1 / 12 if dr and dc else 1 / 6) * image[0, :, r + dr, c + dc]
        return s

    ka, kb = known_sum(2, 1), known_sum(2, 2)
    # a = ka + b / 6 and b = kb + a / 6
    a = (ka + kb / 6) / (1 - 1 / 36)
    b = kb + a / 6
    out = _masker(noise=0.0, solver=solver, tolerance=1e-12).impute(_model(5), image, keep, [0])
    torch.testing.assert_close(out[0, :, 2, 1], a, rtol=0, atol=1e-10)
    torch.testing.assert_close(out[0, :, 2, 2], b, rtol=0, atol=1e-10)


# -- (b) against an independent solve ------------------------------------------------------------------
def _cases(height: int = 11, width: int = 13):
    gen = np.random.default_rng(0)
    images = gen.random((5, 3, height, width))
    keeps = [
        gen.random((height, width)) > 0.5,  # scattered
        gen.random((height, width)) > 0.95,  # almost everything removed
        np.ones((height, width), bool),  # nothing removed
    ]
    blob = np.ones((height, width), bool)
    blob[2:9, 3:12] = False  # one large hole
    keeps.append(blob)
    patches = np.ones((height, width), bool)
    patches[:4, :4] = patches[8:, 4:8] = False  # patch:4 regions, one at the border
    keeps.append(patches)
    keeps[1][0, 0] = True  # at least one pixel kept
    return images, np.stack(keeps)


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_equal_a_dense_solve_of_roads_equations(solver):
    images, keeps = _cases()
    expected = np.stack([_dense_reference(images[i], keeps[i]) for i in range(len(images))])
    inputs = torch.from_numpy(images)
    keep = torch.from_numpy(keeps[:, None].astype(np.float64))
    out = _masker(noise=0.0, solver=solver, tolerance=1e-11).impute(_model(11), inputs, keep, list(range(5)))
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-8)


def test_default_float32_multigrid_is_close_to_the_exact_solution():
    images, keeps = _cases(24, 20)
    expected = np.stack([_dense_reference(images[i], keeps[i]) for i in range(len(images))])
    out = road.impute_multigrid(torch.from_numpy(images).float(), torch.from_numpy(keeps[:, None]).float())
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-4)


def test_road_system_is_roads_matrix():
    """The sparse system: diagonal -(sum of in-image weights), 1/6 and 1/12 between unknown neighbours."""
    keep = np.ones((3, 3), bool)
    keep[0, 0] = keep[0, 1] = keep[1, 1] = False
    image = np.arange(9, dtype=np.float64).reshape(1, 3, 3)
    matrix, rhs, unknown = road.road_system(keep, image)
    assert unknown.tolist() == [0, 1, 4]
    dense = matrix.toarray()
    np.testing.assert_allclose(np.diag(dense), [-5 / 12, -2 / 3, -1.0])
    np.testing.assert_allclose(dense[0, 1], 1 / 6)  # (0,0)-(0,1) direct
    np.testing.assert_allclose(dense[0, 2], 1 / 12)  # (0,0)-(1,1) diagonal
    np.testing.assert_allclose(dense, dense.T)
    # (0,0) has one known neighbour, (1,0) = pixel 3, weight 1/6: rhs = -1/6 * 3
    np.testing.assert_allclose(rhs[0, 0], -3 / 6)


# -- (c) noise and the empty image ---------------------------------------------------------------------
def test_noise_is_added_to_imputed_pixels_only_in_pixel_units_and_seeded():
    model = _model(32, std=0.5)
    inputs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keep = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    clean = _masker(noise=0.0).impute(model, inputs, keep, [7, 8])
    noisy = _masker(noise=0.01).impute(model, inputs, keep, [7, 8])
    diff = noisy - clean
    assert torch.equal(diff * keep, torch.zeros_like(diff))
    removed = diff.expand_as(inputs)[(1 - keep).expand_as(inputs).bool()]
    assert removed.std().item() == pytest.approx(0.01 / 0.5, rel=0.1)  # 0.01 in pixel units = 0.02 here
    again = _masker(noise=0.01).impute(model, inputs.flip(0), keep.flip(0), [8, 7]).flip(0)
    torch.testing.assert_close(again, noisy)  # per image, independent of the row order
    other = _masker(noise=0.01).impute(model, inputs, keep, [9, 8])
    assert not torch.allclose(other[0], noisy[0]) and torch.allclose(other[1], noisy[1])


def test_fully_removed_image_is_the_mean_plus_noise_and_is_the_baseline():
    model = _model(8, std=0.25)
    inputs = torch.rand(2, 3, 8, 8)
    masker = _masker()
    empty = masker.impute(model, inputs, torch.zeros(2, 1, 8, 8), [3, 4])
    assert empty.abs().mean().item() == pytest.approx(0.01 / 0.25 * (2 / np.pi) ** 0.5, rel=0.2)
    torch.testing.assert_close(masker.baseline(model, inputs, [3, 4]), empty)
    assert torch.equal(_masker(noise=0.0).baseline(model, inputs, [3, 4]), torch.zeros_like(inputs))


# -- (d) the sweep and the metrics ---------------------------------------------------------------------
def _reference_curves(model, inputs, attribution, target, masker, seeds, steps, mode, order):
    """Per image and step: mask from the stable ranking, imputed row by row, softmax of the target."""
    _, _, h, w = inputs.shape
    g = Granularity.parse("pixel", h, w)
    scores = g.region_scores(attribution)
    rank = ranks(scores if order == "most" else -scores)
    curves = []
    for i in range(len(inputs)):
        row = []
        for count in step_counts(h * w, steps).tolist():
            moved = (rank[i] < count).float().view(1, 1, h, w)
            keep = moved if mode == "insert" else 1 - moved
            composite = masker.impute(model, inputs[i : i + 1], keep, [seeds[i]])
            with torch.no_grad():
                row.append(float(model.module(composite).softmax(1)[0, target[i]]))
        curves.append(row)
    return torch.tensor(curves)


@pytest.mark.parametrize("mode,order", [("remove", "most"), ("remove", "least"), ("insert", "most")])
def test_sweep_imputes_every_composite_whatever_the_chunking(mode, order):
    model = _model(12)
    inputs = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    attribution = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3])
    masker, seeds = _masker(noise=0.05), [11, 12]
    g = Granularity.parse("pixel", 12, 12)
    expected = _reference_curves(model, inputs, attribution, target, masker, seeds, 6, mode, order)
    for chunk in (3, 64):
        curves = perturbation_curves(model, inputs, masker.baseline(model, inputs, seeds), attribution, g, steps=6,
                                     mode=mode, order=order, target=target, chunk_size=chunk,
                                     fill=masker.composite_fill(model, seeds))
        torch.testing.assert_close(curves, expected, rtol=1e-4, atol=1e-6)
    plain = perturbation_curves(model, inputs, masker.baseline(model, inputs, seeds), attribution, g, steps=6,
                                mode=mode, order=order, target=target)
    assert not torch.allclose(plain, expected)  # the imputation, not the fixed baseline, was scored


@pytest.mark.parametrize("metric_cls", [MoRF, Deletion])
def test_metrics_sweep_with_road(tmp_path, metric_cls):
    from harness_plugins.attributors.random_map import RandomMap

    model = _model(16)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    batch = Batch(samples=[Sample(id="a", path=""), Sample(id="b", path="")], images=images, seeds=[5, 6])
    masker = _masker(granularity="pixel")
    ctx = MetricContext(models=[model], attributor=RandomMap(), masker=masker, seed=0, batch_size=4,
                        out_dir=tmp_path, run_id="road")
    records = metric_cls(metric_cls.Options(steps=5)).evaluate(batch, ctx)
    inputs = batch.inputs(model)
    attribution = RandomMap().attribute(model, inputs, torch.zeros(2, dtype=torch.long), batch.seeds)
    target = torch.tensor([r["values"]["target"] for r in records])
    expected = _reference_curves(model, inputs, attribution, target, masker, batch.seeds, 5, "remove", "most")
    got = torch.tensor([r["values"]["curve"] for r in records])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


# -- (e) errors ------------------------------------------------------------------------------------------
def test_soft_granularity_is_a_one_line_error():
    with pytest.raises(HarnessError, match="pixel or patch:P"):
        build_options(RoadOptions, {"granularity": "grid:7"}, "masker")
    model = _model(8)
    with pytest.raises(HarnessError, match="hard granularity"):
        _masker().impute(model, torch.rand(1, 3, 8, 8), torch.full((1, 1, 8, 8), 0.5), [0])
    for bad in ({"noise": -0.1}, {"tolerance": 0}, {"solver": "cg"}):
        with pytest.raises(HarnessError):
            build_options(RoadOptions, bad, "masker")


def test_registered_as_road():
    registered = []
    road.register_maskers(registered.append)
    assert [c.id for c in registered] == ["road"]
    assert road.PAPER_PERCENTAGES == (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)


def _with_entry_points(monkeypatch, *modules: str):
    """Register new bundled modules until pyproject lists them."""
    from importlib import metadata

    from harness import plugins

    original = plugins.metadata.entry_points
    installed = {ep.value for ep in original(group="harness")}
    extra = [metadata.EntryPoint(name=m.rsplit(".", 1)[1], value=m, group="harness") for m in modules if m not in installed]

    def entry_points(**kwargs):
        found = original(**kwargs)
        return [*found, *extra] if kwargs.get("group") == "harness" else found

    monkeypatch.setattr(plugins.metadata, "entry_points", entry_points)


def test_cli_morf_with_road(cli, tmp_path, fresh_registry, monkeypatch):
    import json

    _with_entry_points(monkeypatch, "harness_plugins.maskers.road")
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "morf", "--masker", "road", "--limit", "1",
              "-o", "masker.granularity=pixel", "-o", "metric.steps=10", "--out", str(tmp_path), "--quiet")
    assert res.exit_code == 0, res.stderr
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["masker"]["id"] == "road" and result["masker"]["options"]["noise"] == 0.01
    assert result["values"]["steps"] == 10  # fractions 0, 0.1, ..., 1: the paper's 0.1 ... 0.9 among them
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "morf", "--masker", "road", "--limit", "1",
              "-o", "masker.granularity=grid:4", "--out", str(tmp_path), "--quiet")
    assert res.exit_code != 0 and "pixel or patch:P" in res.stderr and "Traceback" not in res.stderr
