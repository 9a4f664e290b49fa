"""Batched similarities of attribution maps, as the sanity-check papers compute them (per image, never per batch).

Maps are (B, H, W) tensors; every function works row by row, so an image's score never depends on
the other images of its batch. Definitions follow the reference code of Adebayo et al. 2018
(``sanity_checks_saliency`` notebooks; METHODS.md section 13):

- ``spearman_abs``: both maps through PAIR's ``VisualizeImageGrayscale`` (``|a|``, then
  ``(x - min) / (p99 - min)`` clipped to [0, 1]), then Spearman's rank correlation (average ranks for
  ties, as ``scipy.stats.spearmanr``; the p99 clipping creates ties);
- ``spearman``: both maps through PAIR's ``VisualizeImageDiverging`` (signed; ``s = |p99(a)|``,
  ``(a + s) / (2 s)`` clipped to [-1, 1]), then Spearman;
- ``ssim``: both maps min-max scaled to [0, 1], then SSIM with a Gaussian window (sigma 1.5, truncated
  at 3.5 sigma: 11 x 11), K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1)), symmetric
  ("reflect" in scipy) borders, mean over the image minus a 5-pixel border: exactly
  ``skimage.metrics.structural_similarity(gaussian_weights=True, data_range=R)``; the reference code
  passed no data_range, which old scikit-image took as 2 for float images (``ssim_data_range``);
- ``hog``: both maps min-max scaled to [0, 1], ``skimage.feature.hog`` (9 orientations, 16 x 16 px cells,
  3 x 3 cells per block, L2-Hys), and the two feature vectors compared by Spearman (as the reference
  code; the paper's text says Pearson: ``hog_correlation``).

A similarity that is undefined (a constant map has no ranks to correlate) is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from harness.errors import HarnessError

Similarity = Literal["spearman_abs", "spearman", "ssim", "hog"]
SIMILARITIES: tuple[Similarity, ...] = ("spearman_abs", "spearman", "ssim", "hog")


@dataclass(frozen=True)
class SimilaritySettings:
    """Parameters of the similarities (defaults: Adebayo et al.'s reference code)."""

    percentile: float = 99.0
    ssim_data_range: float = 2.0
    ssim_sigma: float = 1.5
    hog_cell: int = 16
    hog_block: int = 3
    hog_correlation: Literal["spearman", "pearson"] = "spearman"


def flat(maps: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, N) float64."""
    return maps.detach().reshape(len(maps), -1).to(torch.float64)


def row_percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-th percentile of (B, N) with linear interpolation (``numpy.percentile``'s default)."""
    return _percentile_of_sorted(x.sort(dim=1).values, q)


def grayscale(maps: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """PAIR ``VisualizeImageGrayscale`` per image: ``clip((|a| - min) / (p - min), 0, 1)``, (B, N)."""
    x = flat(maps).abs()
    low = x.min(1, keepdim=True).values
    high = row_percentile(x, percentile)[:, None]
    return ((x - low) / (high - low).clamp_min(torch.finfo(x.dtype).tiny)).clamp(0, 1)


def diverging(maps: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """PAIR ``VisualizeImageDiverging`` per image: ``s = |p(a)|``, ``clip((a + s) / (2 s), -1, 1)``, (B, N)."""
    x = flat(maps)
    span = row_percentile(x, percentile).abs()[:, None].clamp_min(torch.finfo(x.dtype).tiny)
    return ((x + span) / (2 * span)).clamp(-1, 1)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] by its own min and max (a constant map becomes zeros); shape kept, float64."""
    x = maps.detach().to(torch.float64)
    dims = tuple(range(1, x.dim()))
    low = x.amin(dims, keepdim=True)
    span = x.amax(dims, keepdim=True) - low
    return torch.where(span > 0, (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def sort_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, order) of each row sorted ascending; on the CPU by numpy's introsort (about twice as fast
    as torch's sort there); the order within ties is arbitrary, which average ranks do not see."""
    if x.device.type != "cpu":
        return x.sort(dim=1)
    import numpy as np

    array = x.detach().numpy()
    order = np.argsort(array, axis=1)
    return torch.from_numpy(np.take_along_axis(array, order, axis=1)), torch.from_numpy(order)


def ranks_of_sorted(values: torch.Tensor, order: torch.Tensor, finite: torch.Tensor | None = None) -> torch.Tensor:
    """Average ranks (float64) from row-sorted ``values`` and the ``order`` that sorted them; rows
    that are not ``finite`` (B,) are NaN, so their correlations are NaN."""
    n = values.shape[1]
    position = torch.arange(1, n + 1, dtype=torch.float64, device=values.device).expand(values.shape)
    starts = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, position, torch.zeros_like(position)).cummax(1).values
    last = torch.where(ends, position, torch.full_like(position, n + 1)).flip(1).cummin(1).values.flip(1)
    ranks = torch.empty_like(position)
    ranks.scatter_(1, order, (first + last) / 2)
    if finite is not None:
        ranks[~finite] = math.nan
    return ranks


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Per-row ranks 1..N of (B, N), ties sharing their average rank (``scipy.stats.rankdata``)."""
    values, order = sort_rows(x)
    return ranks_of_sorted(values, order, torch.isfinite(values).all(1))


def _percentile_of_sorted(ordered: torch.Tensor, q: float) -> torch.Tensor:
    position = q / 100 * (ordered.shape[1] - 1)
    low = math.floor(position)
    high = min(low + 1, ordered.shape[1] - 1)
    return ordered[:, low] + (position - low) * (ordered[:, high] - ordered[:, low])


def grayscale_ranks(maps: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """``average_ranks(grayscale(maps))`` with one sort per map (the normalisation is monotone)."""
    values, order = sort_rows(maps.detach().reshape(len(maps), -1).abs())
    ordered = values.to(torch.float64)
    low = ordered[:, :1]
    high = _percentile_of_sorted(ordered, percentile)[:, None]
    scaled = ((ordered - low) / (high - low).clamp_min(torch.finfo(ordered.dtype).tiny)).clamp(0, 1)
    return ranks_of_sorted(scaled, order, torch.isfinite(ordered).all(1))


def diverging_ranks(maps: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """``average_ranks(diverging(maps))`` with one sort per map (the normalisation is monotone)."""
    values, order = sort_rows(maps.detach().reshape(len(maps), -1))
    ordered = values.to(torch.float64)
    span = _percentile_of_sorted(ordered, percentile).abs()[:, None].clamp_min(torch.finfo(ordered.dtype).tiny)
    return ranks_of_sorted(((ordered + span) / (2 * span)).clamp(-1, 1), order, torch.isfinite(ordered).all(1))


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of (B, N) pairs; NaN where a row is constant."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denom = (a.square().sum(1) * b.square().sum(1)).sqrt()
    out = (a * b).sum(1) / denom
    return torch.where(denom > 0, out, torch.full_like(out, math.nan))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation of (B, N) pairs (average ranks for ties); NaN for a constant
    or non-finite row."""
    return pearson(average_ranks(a), average_ranks(b))


def _gaussian_kernel(sigma: float, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * x.square() / sigma**2)
    return k / k.sum()


def _symmetric_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pad the last two dims by ``r`` with scipy's "reflect" (edge repeated: d c b a | a b c d)."""
    x = torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], dim=-2)
    return torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], dim=-1)


def _gaussian_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of (B, 1, H, W) with symmetric borders (``scipy.ndimage.gaussian_filter``)."""
    r = len(kernel) // 2
    padded = _symmetric_pad(x, r)
    k = kernel.to(x)
    out = torch.nn.functional.conv2d(padded, k.view(1, 1, -1, 1))
    return torch.nn.functional.conv2d(out, k.view(1, 1, 1, -1))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image mean SSIM of (B, H, W) pairs, equal to scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, sigma=sigma, data_range=data_range`` (sample covariance)."""
    kernel = _gaussian_kernel(sigma)
    win = len(kernel)
    if min(a.shape[-2:]) < win:
        raise HarnessError(f"SSIM needs maps of at least {win} x {win} pixels (Gaussian window, sigma {sigma}); got {tuple(a.shape[-2:])}")
    x = a.detach().to(torch.float64)[:, None]
    y = b.detach().to(torch.float64)[:, None]
    stacked = _gaussian_filter(torch.cat([x, y, x * x, y * y, x * y], 1).flatten(0, 1)[:, None], kernel)
    ux, uy, uxx, uyy, uxy = stacked.view(len(a), 5, *a.shape[-2:]).unbind(1)
    cov_norm = win * win / (win * win - 1)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return s[:, pad : s.shape[1] - pad, pad : s.shape[2] - pad].mean((1, 2))


def hog_features(maps: torch.Tensor, cell: int = 16, block: int = 3) -> torch.Tensor:
    """``skimage.feature.hog`` of each map (already in [0, 1]): (B, F) float64 on the maps' device."""
    import numpy as np
    from skimage.feature import hog

    if min(maps.shape[-2:]) < cell * block:
        raise HarnessError(
            f"HOG needs maps of at least {cell * block} x {cell * block} pixels ({block} x {block} cells of {cell} px); "
            f"got {tuple(maps.shape[-2:])}: leave hog out of -o metric.similarities or lower hog_cell"
        )
    arrays = maps.detach().to("cpu", torch.float64).numpy()
    rows = [hog(m, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(block, block),
                block_norm="L2-Hys", feature_vector=True) for m in arrays]
    return torch.from_numpy(np.stack(rows)).to(maps.device)


def prepare(maps: torch.Tensor, which: tuple[str, ...], settings: SimilaritySettings) -> dict[str, torch.Tensor]:
    """What each similarity compares (ranks for the Spearman correlations), computed once per map set:
    the original maps are prepared once and compared with every randomised model's."""
    out: dict[str, torch.Tensor] = {}
    if "spearman_abs" in which:
        out["spearman_abs"] = grayscale_ranks(maps, settings.percentile)
    if "spearman" in which:
        out["spearman"] = diverging_ranks(maps, settings.percentile)
    if "ssim" in which or "hog" in which:
        scaled = minmax(maps)
        if "ssim" in which:
            out["ssim"] = scaled
        if "hog" in which:
            features = hog_features(scaled, settings.hog_cell, settings.hog_block)
            out["hog"] = average_ranks(features) if settings.hog_correlation == "spearman" else features
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], settings: SimilaritySettings) -> dict[str, torch.Tensor]:
    """Per-image similarity (B,) for every entry prepared in both ``a`` and ``b`` (Pearson of ranks = Spearman)."""
    out: dict[str, torch.Tensor] = {}
    for name in a:
        if name == "ssim":
            out[name] = ssim(a[name], b[name], settings.ssim_data_range, settings.ssim_sigma)
        else:
            out[name] = pearson(a[name], b[name])
    return out


def similarities(original: torch.Tensor, other: torch.Tensor, which: tuple[str, ...],
                 settings: SimilaritySettings = SimilaritySettings()) -> dict[str, torch.Tensor]:
    """Per-image similarities of two (B, H, W) map sets."""
    return compare(prepare(original, which, settings), prepare(other, which, settings), settings)
