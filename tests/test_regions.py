"""Granularities (harness.regions): SAG's soft grid tents, hard patches, pixels, and ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.regions import Granularity, ranks


# -- grid:G (SAG soft tents) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid7():
    return Granularity.parse("grid:7", 224, 224)


def test_grid_shape_and_count(grid7):
    assert grid7.kind == "grid" and grid7.size == 7
    assert grid7.grid_shape == (7, 7)
    assert grid7.n_regions == 49
    assert tuple(grid7.tents.shape) == (49, 224 * 224)
    assert grid7.label == "grid:7"


def test_grid_tents_partition_of_unity(grid7):
    tents = grid7.tents.double()
    assert tents.min() >= -1e-7 and tents.max() <= 1 + 1e-6
    total = tents.sum(0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_grid_tent_peaks_at_its_cell_centre(grid7):
    """Tent r is 1 at the pixel where cell r sits under align_corners=True (i * 223 / 6)."""
    tents = grid7.tents.view(7, 7, 224, 224)
    for r, c in [(0, 0), (3, 3), (6, 6), (2, 5)]:
        y, x = round(r * 223 / 6), round(c * 223 / 6)
        assert float(tents[r, c, y, x]) == pytest.approx(1.0, abs=0.03)  # within half a pixel of the node
        # and it is the largest tent there
        assert int(tents[:, :, y, x].argmax()) == r * 7 + c


def test_grid_render_all_ones_reproduces_image(grid7):
    mask = grid7.render(torch.ones(1, 49))
    assert tuple(mask.shape) == (1, 1, 224, 224)
    assert torch.allclose(mask, torch.ones_like(mask), atol=1e-6)
    image = torch.rand(1, 3, 224, 224)
    baseline = torch.rand(1, 3, 224, 224)
    composite = mask * image + (1 - mask) * baseline
    assert torch.allclose(composite, image, atol=1e-5)
    # all zeros -> nothing of the image
    assert torch.allclose(grid7.render(torch.zeros(1, 49)), torch.zeros(1, 1, 224, 224))


def test_grid_render_one_cell_equals_its_tent(grid7):
    keep = torch.zeros(2, 49)
    keep[0, 24] = 1
    keep[1, 3] = 0.5
    mask = grid7.render(keep)
    assert torch.allclose(mask[0, 0].reshape(-1), grid7.tents[24], atol=1e-6)
    assert torch.allclose(mask[1, 0].reshape(-1), 0.5 * grid7.tents[3], atol=1e-6)


def test_grid_interior_tent_spans_about_74_px(grid7):
    """SAG: an interior tent spans about 74 x 74 px at 224 for G = 7 (2 * 223 / 6 = 74.3)."""
    middle = grid7.tents[24].view(224, 224)  # row 3, col 3
    cols = int((middle.abs() > 0).any(0).sum())
    rows = int((middle.abs() > 0).any(1).sum())
    assert 73 <= cols <= 75, cols
    assert 73 <= rows <= 75, rows
    # a corner tent covers only about half of that
    corner = grid7.tents[0].view(224, 224)
    assert 36 <= int((corner > 0).any(0).sum()) <= 38


def test_grid_region_scores_is_tent_projection(grid7):
    torch.manual_seed(0)
    attribution = torch.rand(2, 224, 224)
    scores = grid7.region_scores(attribution)
    assert tuple(scores.shape) == (2, 49)
    tents = grid7.tents.view(49, 224, 224)
    for b in range(2):
        for r in (0, 24, 48):
            expected = float((attribution[b].double() * tents[r].double()).sum())
            assert float(scores[b, r]) == pytest.approx(expected, rel=1e-4)
    # tents sum to 1, so the region scores sum to the total attribution
    assert torch.allclose(scores.sum(1), attribution.sum((1, 2)), rtol=1e-4)


# -- patch:P ----------------------------------------------------------------------------------------
def _hand_patch_sums(attribution: np.ndarray, p: int) -> np.ndarray:
    b, h, w = attribution.shape
    rows, cols = -(-h // p), -(-w // p)
    out = np.zeros((b, rows * cols))
    for n in range(b):
        for i in range(rows):
            for j in range(cols):
                out[n, i * cols + j] = attribution[n, i * p : (i + 1) * p, j * p : (j + 1) * p].sum()
    return out


@pytest.mark.parametrize("height,width,p,grid", [(32, 32, 8, (4, 4)), (20, 20, 8, (3, 3)), (20, 27, 8, (3, 4))])
def test_patch_region_scores_equal_hand_block_sums(height, width, p, grid):
    g = Granularity.parse(f"patch:{p}", height, width)
    assert g.grid_shape == grid
    assert g.n_regions == grid[0] * grid[1]
    rng = np.random.default_rng(1)
    attribution = rng.normal(size=(2, height, width)).astype(np.float32)
    scores = g.region_scores(torch.from_numpy(attribution))
    assert tuple(scores.shape) == (2, g.n_regions)
    np.testing.assert_allclose(scores.numpy(), _hand_patch_sums(attribution.astype(np.float64), p), atol=1e-4)


def test_patch_render_is_hard_blocks_including_partial_edges():
    g = Granularity.parse("patch:8", 20, 20)  # 3 x 3 regions, the last row/col 4 px wide
    keep = torch.zeros(1, 9)
    keep[0, 8] = 1  # bottom-right partial block
    keep[0, 1] = 0.25  # top-middle block
    mask = g.render(keep)[0, 0]
    expected = torch.zeros(20, 20)
    expected[16:, 16:] = 1
    expected[:8, 8:16] = 0.25
    assert torch.equal(mask, expected)
    # every pixel belongs to exactly one patch
    full = g.render(torch.ones(1, 9))
    assert torch.equal(full, torch.ones(1, 1, 20, 20))


# -- pixel -------------------------------------------------------------------------------------------
def test_pixel_render_and_scores_are_reshapes():
    g = Granularity.parse("pixel", 5, 7)
    assert g.n_regions == 35 and g.grid_shape == (5, 7) and g.label == "pixel"
    attribution = torch.randn(3, 5, 7)
    assert torch.equal(g.region_scores(attribution), attribution.reshape(3, 35))
    keep = torch.rand(3, 35)
    assert torch.equal(g.render(keep), keep.view(3, 1, 5, 7))


# -- ranks ---------------------------------------------------------------------------------------------
def test_ranks_descending():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assert ranks(scores).tolist() == [[3, 0, 1, 2]]


def test_ranks_ties_break_by_index():
    scores = torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert ranks(scores).tolist() == [[2, 0, 3, 1, 4], [0, 1, 2, 3, 4]]


def test_ranks_match_stable_numpy_argsort_on_many_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(3, 500)).astype(np.float32)  # heavy ties
    order = np.argsort(-scores, axis=1, kind="stable")
    expected = np.empty_like(order)
    for b in range(3):
        expected[b, order[b]] = np.arange(500)
    assert np.array_equal(ranks(torch.from_numpy(scores)).numpy(), expected)


# -- parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["patch:0", "grid:1", "grid:0", "foo", "patch", "patch:-1", "grid:x", ""])
def test_parse_errors_are_harness_errors(text):
    with pytest.raises(HarnessError):
        Granularity.parse(text, 224, 224)


@pytest.mark.parametrize("text,kind,size", [("pixel", "pixel", 1), ("patch:16", "patch", 16), (" grid:7 ", "grid", 7), ("patch:1", "patch", 1), ("grid:2", "grid", 2)])
def test_parse_accepts(text, kind, size):
    g = Granularity.parse(text, 224, 224)
    assert (g.kind, g.size) == (kind, size)
