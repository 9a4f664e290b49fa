"""ROAD's noisy linear imputation (Rong et al., ICML 2022) as a masker: ``--masker road``.

Every removed pixel becomes the weighted mean of its 8 neighbours (direct neighbours 1/6, diagonal
ones 1/12; neighbours outside the image are dropped and the weights renormalised), where removed
neighbours are themselves unknowns: one sparse linear system per image, shared by the colour
channels, with the known neighbours on the right-hand side (``road/imputations.py``:
``NoisyLinearImputer``). Gaussian noise of standard deviation ``noise`` (0.01 in [0, 1] pixel units)
is then added to every imputed pixel. The imputation is affine-equivariant per channel (every
equation's weights sum to 1), so solving in the model's normalised space and adding noise of
``noise / std`` there equals imputing in pixel space and normalising afterwards, as ROAD does.

Unlike a fixed baseline image, the fill depends on *which* pixels are removed, so every composite of
a sweep is imputed separately: the sweep hands the masker each chunk of composites with its keep
masks (``composite_fill``) and all of them are solved together. ``solver=multigrid`` (default) runs
conjugate gradients preconditioned by a geometric multigrid V-cycle, batched over the chunk and the
channels on the model's device, until the residual of every system is below ``tolerance`` times its
right-hand side (1e-5: the imputed values then agree with a direct solve to about 1e-4 of the pixel
range, a hundredth of the added noise). ``solver=direct`` builds ROAD's sparse system and factorises
it with SuperLU per image (scipy; exact, slower).

A composite with no pixel left (all removed) has no system to solve; it becomes the dataset mean
(0 after normalisation) plus the same noise. This is also the masker's ``baseline`` (what metrics
that take a fixed baseline image, such as SAG, get).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

import harness
from harness.components import Masker
from harness.errors import HarnessError
from harness.model import LoadedModel
from harness_plugins.maskers.fills import FillOptions

NEIGHBOUR_WEIGHTS: tuple[tuple[tuple[int, int], float], ...] = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
)
"""(row offset, column offset), weight: ROAD's ``neighbors_weights``."""

PAPER_PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)
"""The fractions of pixels ROAD removes (``noretrain_params.json``)."""


# -- the stencil -------------------------------------------------------------------------------------
def _smooth121(u: torch.Tensor) -> torch.Tensor:
    """The 3 x 3 stencil [1 2 1]^T [1 2 1] over the last two dims, zeros outside."""
    rows = u * 2
    rows[..., 1:].add_(u[..., :-1])
    rows[..., :-1].add_(u[..., 1:])
    out = rows * 2
    out[..., 1:, :].add_(rows[..., :-1, :])
    out[..., :-1, :].add_(rows[..., 1:, :])
    return out


def neighbour_weight_sum(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, H, W) sum of the weights of each pixel's neighbours inside the image (1 in the interior)."""
    ones = torch.ones(1, 1, height, width, dtype=dtype, device=device)
    return (_smooth121(ones) - 4 * ones) / 12


def _prolong_axis(u: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Cell-centred linear interpolation doubling axis ``dim`` (zeros beyond the ends), cut to ``length``."""
    n = u.shape[dim]
    p = F.pad(u, (1, 1) if dim == -1 else (0, 0, 1, 1))
    mid, low, high = p.narrow(dim, 1, n), p.narrow(dim, 0, n), p.narrow(dim, 2, n)
    even = torch.add(low, mid, alpha=3).mul_(0.25)
    odd = torch.add(high, mid, alpha=3).mul_(0.25)
    both = torch.stack((even, odd), dim=dim)  # (..., n, 2) along dim
    shape = list(u.shape)
    shape[dim] = 2 * n
    return both.reshape(shape).narrow(dim, 0, length)


def _restrict_axis(u: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """The transpose of :func:`_prolong_axis`: length ``L <= 2n`` along ``dim`` -> ``n``."""
    missing = 2 * n - u.shape[dim]
    if missing:
        u = F.pad(u, (0, missing) if dim == -1 else (0, 0, 0, missing))
    if dim == -1:
        pairs = u.reshape(*u.shape[:-1], n, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
    else:
        pairs = u.reshape(*u.shape[:-2], n, 2, u.shape[-1])
        even, odd = pairs[..., 0, :], pairs[..., 1, :]
    out = torch.add(even, odd).mul_(0.75)
    out.narrow(dim, 0, n - 1).add_(even.narrow(dim, 1, n - 1), alpha=0.25)
    out.narrow(dim, 1, n - 1).add_(odd.narrow(dim, 0, n - 1), alpha=0.25)
    return out


class _Level:
    """One grid of the multigrid hierarchy: the masked operator, its Jacobi smoother, its coarser grid.

    The operator is ROAD's system with the sign flipped (positive definite): for an unknown pixel i,
    ``(A u)_i = s_i u_i - sum_j w_ij u_j`` over its unknown neighbours j (u is zero on known pixels).
    """

    SMOOTHING_WEIGHT = 1.0  # damped Jacobi: the 9-point operator's high frequencies lie in [2/3, 4/3]
    COARSEST_SWEEPS = 30

    def __init__(self, unknown: torch.Tensor):
        self.unknown = unknown  # (N, 1, H, W) 0/1
        self.height, self.width = unknown.shape[-2:]
        s = neighbour_weight_sum(self.height, self.width, unknown.dtype, unknown.device)
        self.centre = unknown * (s + 1 / 3)  # A u = centre * u - unknown / 12 * smooth121(u)
        self.twelfth = unknown / 12
        self.jacobi = unknown * (self.SMOOTHING_WEIGHT / s.clamp_min(1e-12))
        self.coarse: _Level | None = None
        if min(self.height, self.width) > 2:
            hc, wc = -(-self.height // 2), -(-self.width // 2)
            padded = F.pad(unknown, (0, 2 * wc - self.width, 0, 2 * hc - self.height))
            # a coarse cell is unknown when all its children are: known pixels keep constraining coarse grids
            coarse = padded.reshape(len(unknown), 1, hc, 2, wc, 2).amin(dim=(3, 5))
            if bool(coarse.any()):
                self.coarse = _Level(coarse)

    def subset(self, rows: torch.Tensor) -> "_Level":
        """The same hierarchy for the rows ``rows`` of the batch only."""
        level = _Level.__new__(_Level)
        level.height, level.width = self.height, self.width
        level.unknown, level.centre = self.unknown[rows], self.centre[rows]
        level.twelfth, level.jacobi = self.twelfth[rows], self.jacobi[rows]
        level.coarse = self.coarse.subset(rows) if self.coarse is not None else None
        return level

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """A u for u (N, C, H, W) that is zero on known pixels."""
        return torch.addcmul(self.centre * u, self.twelfth, _smooth121(u), value=-1)

    def prolong(self, e: torch.Tensor) -> torch.Tensor:
        return _prolong_axis(_prolong_axis(e, -1, self.width), -2, self.height).mul_(self.unknown)

    def restrict(self, r: torch.Tensor) -> torch.Tensor:
        assert self.coarse is not None
        out = _restrict_axis(_restrict_axis(r * self.unknown, -1, self.coarse.width), -2, self.coarse.height)
        return out.mul_(self.coarse.unknown)

    def vcycle(self, r: torch.Tensor, sweeps: int = 2) -> torch.Tensor:
        """A symmetric V-cycle approximating A^-1 r (an SPD preconditioner)."""
        n = sweeps if self.coarse is not None else self.COARSEST_SWEEPS
        e = self.jacobi * r
        for _ in range(n - 1):
            e.addcmul_(self.jacobi, r - self.apply(e))
        if self.coarse is None:
            return e
        e.add_(self.prolong(self.coarse.vcycle(self.restrict(r - self.apply(e)), sweeps)))
        for _ in range(n):
            e.addcmul_(self.jacobi, r - self.apply(e))
        return e


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(2, 3), keepdim=True)


def impute_multigrid(
    values: torch.Tensor, keep: torch.Tensor, *, tolerance: float = 1e-5, max_iterations: int = 200
) -> torch.Tensor:
    """ROAD's linear imputation of ``values`` (N, C, H, W) where ``keep`` (N, 1, H, W) is 0, by
    multigrid-preconditioned conjugate gradients, batched; known pixels are returned unchanged.

    Each system (row and channel) stops when its residual is at most ``tolerance`` times its
    right-hand side. Every row must keep at least one pixel (else the system is singular).
    """
    keep = keep.to(values.dtype)
    unknown = 1 - keep
    known = values * keep
    out = known.clone()
    level = _Level(unknown)
    b = unknown * (_smooth121(known) - 4 * known) / 12  # the known neighbours' weighted sum
    u = torch.zeros_like(values)
    r = b.clone()
    z = level.vcycle(r)
    p = z.clone()
    rz = _dot(r, z)
    limit = tolerance * b.square().sum(dim=(2, 3), keepdim=True).sqrt()
    rows = torch.arange(len(values), device=values.device)  # the rows still iterating
    tiny = torch.finfo(values.dtype).tiny
    for iteration in range(max_iterations + 1):
        norm = r.square().sum(dim=(2, 3), keepdim=True).sqrt()
        done = ((norm <= limit) | ~norm.isfinite()).flatten(1).all(1)  # converged (or non-finite inputs)
        if iteration == max_iterations:
            done[:] = True
        if bool(done.any()):  # store finished rows and go on with the others only
            out[rows[done]] += unknown[rows[done]] * u[done]
            if bool(done.all()):
                break
            going = ~done
            rows, level = rows[going], level.subset(going)
            u, r, p, rz, limit = u[going], r[going], p[going], rz[going], limit[going]
        ap = level.apply(p)
        pap = _dot(p, ap)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(tiny), 0.0)
        u.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        z = level.vcycle(r)
        rz_next = _dot(r, z)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(tiny), 0.0)
        rz = rz_next
        p = torch.addcmul(z, beta, p)
    return out


# -- ROAD's sparse system, solved directly ----------------------------------------------------------
def road_system(keep: np.ndarray, image: np.ndarray):
    """ROAD's system for one image: ``keep`` (H, W) bool, ``image`` (C, H, W) -> (A, b, unknown indices)
    with ``A x = b`` (A: sparse CSC, diagonal = -sum of in-image neighbour weights; b: (n, C))."""
    import scipy.sparse as sp

    height, width = keep.shape
    flat_keep = keep.reshape(-1)
    flat = image.reshape(image.shape[0], -1)
    unknown = np.flatnonzero(~flat_keep)
    variable = np.full(height * width, -1, dtype=np.int64)
    variable[unknown] = np.arange(len(unknown))
    row, col = np.divmod(unknown, width)
    diagonal = np.zeros(len(unknown))
    rhs = np.zeros((len(unknown), image.shape[0]))
    rows, cols, vals = [np.arange(len(unknown))], [np.arange(len(unknown))], []
    for (dr, dc), weight in NEIGHBOUR_WEIGHTS:
        r2, c2 = row + dr, col + dc
        inside = (r2 >= 0) & (c2 >= 0) & (r2 < height) & (c2 < width)
        eq = np.flatnonzero(inside)
        neighbour = r2[inside] * width + c2[inside]
        diagonal[eq] -= weight
        is_known = flat_keep[neighbour]
        np.subtract.at(rhs, eq[is_known], weight * flat[:, neighbour[is_known]].T)
        rows.append(eq[~is_known])
        cols.append(variable[neighbour[~is_known]])
        vals.append(np.full(int((~is_known).sum()), weight))
    matrix = sp.csc_matrix(
        (np.concatenate([diagonal, *vals]), (np.concatenate(rows), np.concatenate(cols))), shape=(len(unknown),) * 2
    )
    return matrix, rhs, unknown


def impute_direct(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """ROAD's linear imputation solved exactly per image (SuperLU, symmetric ordering), in float64."""
    from scipy.sparse.linalg import splu

    out = values.detach().to("cpu", torch.float64).clone()
    keep_np = keep.detach().to("cpu").reshape(len(values), *values.shape[-2:]).numpy() > 0.5
    for i in range(len(values)):
        if keep_np[i].all():
            continue
        image = out[i].numpy()
        matrix, rhs, unknown = road_system(keep_np[i], image)
        solution = splu(matrix, permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True}).solve(rhs)
        image.reshape(image.shape[0], -1)[:, unknown] = solution.T
    return out.to(values.device, values.dtype)


# -- the masker -------------------------------------------------------------------------------------
class RoadOptions(FillOptions):
    noise: float = Field(0.01, ge=0)
    """Std of the Gaussian noise added to every imputed pixel, in [0, 1] pixel units (ROAD: 0.01)."""
    solver: Literal["multigrid", "direct"] = "multigrid"
    """multigrid: batched preconditioned CG on the device; direct: ROAD's sparse system, SuperLU per image."""
    tolerance: float = Field(1e-5, gt=0, lt=1)
    """multigrid: stop when every residual is at most this fraction of its right-hand side."""

    @field_validator("granularity")
    @classmethod
    def _hard_regions(cls, value: str | None) -> str | None:
        if value is not None and value.strip().startswith("grid"):
            raise ValueError("road imputes removed pixels, so it needs hard regions: pixel or patch:P, not grid:G")
        return value


FillFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class NoisyLinearImputation(Masker):
    """ROAD: removed pixels take the weighted mean of their 8 neighbours (a sparse system) plus noise."""

    id: ClassVar[str] = "road"
    Options = RoadOptions
    citation: ClassVar[str] = (
        "Rong, Leemann, Borisov, Kasneci, Kasneci. A Consistent and Efficient Evaluation Strategy for "
        "Attribution Methods. ICML 2022"
    )

    def baseline(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Every pixel removed: the dataset mean (0 after normalisation) plus the imputation noise."""
        return self.impute(model, inputs, torch.zeros_like(inputs[:, :1]), seeds)

    def composite_fill(self, model: LoadedModel, seeds: Sequence[int]) -> FillFunction:
        """The sweep's hook: ``fill(composites, keep, image_index)`` imputes each composite's removed
        pixels (``keep`` (N, 1, H, W) is 1 on image pixels); ``seeds`` are the batch's per-image seeds."""

        def fill(composites: torch.Tensor, keep: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
            return self.impute(model, composites, keep, [seeds[i] for i in image_index.tolist()])

        return fill

    def impute(self, model: LoadedModel, inputs: torch.Tensor, keep: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Normalised ``inputs`` (N, 3, H, W) with the pixels where ``keep`` (N, 1, H, W) is 0 imputed."""
        if not bool(((keep == 0) | (keep == 1)).all()):
            raise HarnessError("masker road imputes whole pixels: use a hard granularity (pixel or patch:P), not grid:G")
        keep = keep.to(inputs.dtype)
        kept = keep.flatten(1).sum(1)
        out = torch.zeros_like(inputs)  # rows with nothing kept: the dataset mean
        solvable = torch.nonzero(kept > 0).flatten()
        if len(solvable):
            values, masks = inputs[solvable], keep[solvable]
            if self.options.solver == "direct":
                out[solvable] = impute_direct(values, masks)
            else:
                out[solvable] = impute_multigrid(values, masks, tolerance=self.options.tolerance)
        if self.options.noise > 0:
            noise = imputation_noise(seeds, kept.long().tolist(), inputs.shape[1:]).to(inputs)
            out.addcmul_(noise, (1 - keep) * (self.options.noise / model.std.to(inputs)))
        return out


def imputation_noise(seeds: Sequence[int], kept: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise (N, *shape), one draw per row seeded by its image's seed and its number of
    kept pixels: the same composite gets the same noise however the sweep is chunked."""
    draws = []
    for seed, count in zip(seeds, kept):
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(count) + 0x20AD) % (2**63))
        draws.append(torch.randn(tuple(shape), generator=gen))
    return torch.stack(draws)


@harness.hookimpl
def register_maskers(register):
    register(NoisyLinearImputation)
