"""Attention distance: a patch query whose attention is all on the CLS token (patch mass exactly 0 in
float32) is left out of its head's mean and counted (``excluded_rows``), never taken as distance 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _rep_helpers import run_metric, smooth_images
from conftest import wrap_module
from test_attention_distance import FixedAttention, _metric  # the same fixed-probability attention module

GRID, PATCH = 4, 16  # 4 x 4 patches of 16 px: a 64 px input, 16 patch queries, one CLS token


class CLSViT(nn.Module):
    """One attention layer, 3 heads over 17 tokens (CLS + 16 patches).

    head 0: uniform over all tokens, except patch query 0 (token 1), whose attention is all on CLS;
    head 1: every patch query's attention is all on CLS; head 2: uniform over all tokens.
    """

    def __init__(self):
        super().__init__()
        n = 1 + GRID * GRID
        only_cls = torch.full((n,), -1e4)
        only_cls[0] = 0.0  # exp(-1e4) is exactly 0 in float32: the patch mass of such a row is exactly 0
        head0 = torch.zeros(n, n)
        head0[1] = only_cls
        head1 = only_cls.expand(n, n).clone()
        head2 = torch.zeros(n, n)
        self.num_prefix_tokens = 1
        self.patch_embed = nn.Module()
        self.patch_embed.grid_size = (GRID, GRID)
        self.patch_embed.patch_size = (PATCH, PATCH)
        self.blocks = nn.Sequential(FixedAttention(torch.stack([head0, head1, head2])))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        tokens = x.mean((2, 3))[:, None, :].expand(-1, 1 + GRID * GRID, -1)
        return self.head(self.blocks(tokens)[:, 0])


def _hand_row_distances() -> torch.Tensor:
    """Mean distance (px) of a uniform patch row, per patch query, computed by hand from the grid."""
    cells = [(r * PATCH, c * PATCH) for r in range(GRID) for c in range(GRID)]
    rows = []
    for qy, qx in cells:
        rows.append(sum(((qy - ky) ** 2 + (qx - kx) ** 2) ** 0.5 for ky, kx in cells) / len(cells))
    return torch.tensor(rows, dtype=torch.float64)


def test_a_query_with_all_attention_on_cls_is_left_out_and_counted(tmp_path):
    n_images = 3
    summary, records = run_metric(_metric(), [wrap_module(CLSViT(), size=GRID * PATCH)],
                                  smooth_images(n_images, GRID * PATCH), batch_size=2, out_dir=tmp_path)
    rows = _hand_row_distances()
    kept_mean = float(rows[1:].mean())  # query 0 (all on CLS) has no distance: the mean of the other 15
    counted_as_zero = float(rows[1:].sum() / 16)  # what counting it as distance 0 gives (the old result)
    head0, head1, head2 = summary.values["mad"][0]
    assert head0 == pytest.approx(kept_mean, abs=1e-9)
    assert head0 != pytest.approx(counted_as_zero, abs=1e-3)
    assert head1 is None  # every query of every image put all its attention on CLS
    assert head2 == pytest.approx(float(rows.mean()), abs=1e-9)
    assert summary.values["excluded_rows"] == [[n_images, 16 * n_images, 0]]
    assert summary.values["excluded_rows_total"] == 17 * n_images
    assert summary.value == pytest.approx((kept_mean + float(rows.mean())) / 2, abs=1e-9)  # over the defined heads
    assert summary.values["layer_mean"] == [pytest.approx((kept_mean + float(rows.mean())) / 2, abs=1e-9)]
    assert summary.values["mad_sorted"] == [sorted([head0, head2])]
    for record in records:  # per image: the mean over its kept queries, and how many were left out
        assert record["values"]["mad"][0][0] == pytest.approx(kept_mean, abs=1e-9)
        assert record["values"]["mad"][0][1] is None
        assert record["values"]["excluded_rows"] == [[1, 16, 0]]
    # prefix mass still counts every patch query: query 0 gives CLS everything, the others 1/17
    assert summary.values["prefix_mass"][0][0] == pytest.approx((1 + 15 / 17) / 16, abs=1e-6)
    assert (tmp_path / summary.artifacts["attention_distance"]).exists()  # the plot skips the null head


def test_images_pool_their_kept_queries_and_batching_does_not_matter(tmp_path):
    """Each kept (image, query) row weighs the same; records are per image, so batches of 1 or 3 agree."""
    from harness_plugins.metrics.attention_distance import pooled_mean

    assert pooled_mean([10.0, 20.0], [2, 4]) == pytest.approx((10 * 2 + 20 * 4) / 6)
    assert pooled_mean([None, 20.0], [0, 4]) == 20.0
    assert pooled_mean([None, None], [0, 0]) is None
    model = wrap_module(CLSViT(), size=GRID * PATCH)
    images = smooth_images(3, GRID * PATCH, seed=1)
    one, records_one = run_metric(_metric(), [model], images, batch_size=1, out_dir=tmp_path / "a")
    three, records_three = run_metric(_metric(), [model], images, batch_size=3, out_dir=tmp_path / "b")
    assert [r["values"]["mad"] for r in records_one] == [r["values"]["mad"] for r in records_three]
    assert one.values["mad"] == three.values["mad"] and one.value == three.value


def test_every_query_on_prefix_tokens_is_one_clear_error(tmp_path):
    from harness.errors import HarnessError

    module = CLSViT()
    n = 1 + GRID * GRID
    only_cls = torch.full((n, n), -1e4)
    only_cls[:, 0] = 0.0
    module.blocks[0].logits.copy_(only_cls.expand(3, n, n))
    with pytest.raises(HarnessError, match="every patch query of every image put all its attention on prefix tokens"):
        run_metric(_metric(), [wrap_module(module, size=GRID * PATCH)], smooth_images(1, GRID * PATCH),
                   batch_size=1, out_dir=tmp_path)
