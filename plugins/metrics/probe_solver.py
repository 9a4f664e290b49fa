"""Closed-form ridge probes from streamed sufficient statistics (big_vision ``fewshot_lsr``, in torch).

The probe of big_vision's few-shot evaluator (ViT paper Sec. 4.1): features standardised by the
training split's mean and (population) std + 1e-5, a constant bias feature of value 100 appended
(so the bias is almost unregularised), targets ``Y = 2 * onehot - 1``, and
``W = (X^T X + lambda I)^-1 X^T Y`` over the D + 1 augmented features; the prediction is the argmax.

Here the training features are never kept: :class:`Stats` holds ``n``, ``sum z``, ``z^T z``,
``z^T onehot`` and the class counts (float64, ``z = x - shift`` for a fixed per-feature shift, so a
large common offset costs no precision), and :func:`normal_equations` derives the standardised
system from them exactly. Because the standardised features have zero training mean, the bias
column is orthogonal to them and the augmented system is block diagonal: the D x D block is solved
with a Cholesky factorisation (:func:`solve`) or, for a ridge grid, one eigendecomposition shared
by every lambda (:func:`solve_grid`, big_vision's ``eigh`` route). big_vision's dual form for
N < D, ``X^T (X X^T + lambda I)^-1 Y``, is the same matrix (push-through identity).

Every tensor has a leading *group* axis G: G independent probes over the same examples' rows
(one per token position for per-position probes, else G = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from harness.errors import HarnessError

BIAS = 100.0
"""The constant bias feature (big_vision ``BIAS_CONSTANT``)."""
STD_EPS = 1e-5
"""Added to the training std before dividing (big_vision)."""


@dataclass
class Moments:
    """Sums over one set of examples (G groups, D features, C classes), float64."""

    n: torch.Tensor  # (G,)
    s: torch.Tensor  # (G, D)  sum of z
    xx: torch.Tensor  # (G, D, D)  z^T z
    xy: torch.Tensor  # (G, D, C)  z^T onehot
    counts: torch.Tensor  # (G, C)  examples per class


def moments(x: torch.Tensor, labels: torch.Tensor, classes: int, shift: torch.Tensor,
            gemm_dtype: torch.dtype = torch.float64) -> Moments:
    """The sums of ``x`` (G, m, D) with class indices ``labels`` (m,), relative to ``shift`` (D,).

    ``z = x - shift`` and its products are formed in ``gemm_dtype`` (float32 halves the cost of ``z^T z``;
    with the shift removed their rounding is relative to the features' spread, not their offset); the
    returned sums are float64 and are accumulated in float64 across batches.
    """
    if x.dim() != 3 or labels.shape != (x.shape[1],):
        raise ValueError(f"moments: x must be (G, m, D) and labels (m,), got {tuple(x.shape)} and {tuple(labels.shape)}")
    z = x.to(gemm_dtype) - shift.to(device=x.device, dtype=gemm_dtype)
    index = labels.to(x.device).long()
    groups, m, dim = z.shape
    per_class = torch.zeros(groups, classes, dim, dtype=gemm_dtype, device=x.device).index_add_(1, index, z)  # (G, C, D)
    counts = torch.bincount(index, minlength=classes).to(torch.float64)
    return Moments(
        n=torch.full((groups,), float(m), dtype=torch.float64, device=x.device),
        s=per_class.sum(1).to(torch.float64),
        xx=torch.bmm(z.transpose(1, 2), z).to(torch.float64),
        xy=per_class.transpose(1, 2).to(torch.float64),
        counts=counts.expand(groups, classes).clone(),
    )


class Stats:
    """Running sufficient statistics of G probes (float64), relative to a fixed ``shift`` (D,)."""

    def __init__(self, groups: int, dim: int, classes: int, shift: torch.Tensor, device: torch.device | str = "cpu"):
        f64 = torch.float64
        self.shift = shift.to(dtype=f64, device=device)
        self.n = torch.zeros(groups, dtype=f64, device=device)
        self.s = torch.zeros(groups, dim, dtype=f64, device=device)
        self.xx = torch.zeros(groups, dim, dim, dtype=f64, device=device)
        self.xy = torch.zeros(groups, dim, classes, dtype=f64, device=device)
        self.counts = torch.zeros(groups, classes, dtype=f64, device=device)

    @staticmethod
    def nbytes(groups: int, dim: int, classes: int) -> int:
        """Memory one :class:`Stats` takes."""
        return 8 * groups * (1 + dim + dim * dim + dim * classes + classes) + 8 * dim

    def add(self, m: Moments) -> None:
        """Add the sums of more examples."""
        self.n += m.n
        self.s += m.s
        self.xx += m.xx
        self.xy += m.xy
        self.counts += m.counts

    def merged(self, other: "Stats") -> "Stats":
        """The statistics of both example sets (same shift)."""
        if not torch.equal(self.shift, other.shift):
            raise ValueError("Stats.merged: different shifts")
        out = Stats.__new__(Stats)
        out.shift = self.shift
        out.n, out.s, out.xx = self.n + other.n, self.s + other.s, self.xx + other.xx
        out.xy, out.counts = self.xy + other.xy, self.counts + other.counts
        return out


@dataclass
class Probe:
    """A fitted probe: training mean/std (G, D), weights (G, D + 1, C) on standardised features + bias."""

    mean: torch.Tensor
    std: torch.Tensor
    w: torch.Tensor

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (G, D, C), b (G, C)) with ``logits = x A + b`` on raw features (standardisation folded in)."""
        top, bias = self.w[:, :-1], self.w[:, -1]
        a = top / self.std[:, :, None]
        b = BIAS * bias - torch.einsum("gd,gdc->gc", self.mean / self.std, top)
        return a, b

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (G, m, C) of raw features ``x`` (G, m, D), float64."""
        a, b = self.folded()
        return torch.matmul(x.to(torch.float64), a.to(x.device)) + b.to(x.device)[:, None, :]


@dataclass
class Normal:
    """The standardised normal equations: ``gram`` (G, D, D), ``rhs`` (G, D, C) for the features,
    ``bias_diag`` (G,) and ``bias_rhs`` (G, C) for the bias feature, with the training mean/std."""

    mean: torch.Tensor
    std: torch.Tensor
    gram: torch.Tensor
    rhs: torch.Tensor
    bias_diag: torch.Tensor
    bias_rhs: torch.Tensor


def normal_equations(stats: Stats) -> Normal:
    """``X~^T X~`` and ``X~^T Y`` of the standardised training features, exactly from the sums."""
    n = stats.n
    if bool((n < 1).any()):
        raise HarnessError("a linear probe has no training example (every training image was unreadable?)")
    mu = stats.s / n[:, None]  # mean of z
    scatter = stats.xx - n[:, None, None] * mu[:, :, None] * mu[:, None, :]
    var = (scatter.diagonal(dim1=1, dim2=2) / n[:, None]).clamp_min(0)
    std = var.sqrt() + STD_EPS
    gram = scatter / (std[:, :, None] * std[:, None, :])
    targets = 2 * stats.counts - n[:, None]  # 1^T Y, Y in {-1, 1}
    zy = 2 * stats.xy - stats.s[:, :, None]  # z^T Y
    rhs = (zy - mu[:, :, None] * targets[:, None, :]) / std[:, :, None]
    return Normal(mean=stats.shift[None, :] + mu, std=std, gram=gram, rhs=rhs,
                  bias_diag=n * BIAS**2, bias_rhs=BIAS * targets)


def _assemble(eq: Normal, top: torch.Tensor, ridge: float) -> Probe:
    bias = eq.bias_rhs / (eq.bias_diag + ridge)[:, None]
    return Probe(mean=eq.mean, std=eq.std, w=torch.cat([top, bias[:, None, :]], 1))


def solve(stats: Stats, ridge: float) -> Probe:
    """The ridge probe with ``lambda = ridge`` (Cholesky; eigendecomposition if that fails)."""
    if not ridge > 0:
        raise HarnessError(f"the ridge must be positive, got {ridge}")
    eq = normal_equations(stats)
    eye = torch.eye(eq.gram.shape[-1], dtype=torch.float64, device=eq.gram.device)
    factor, info = torch.linalg.cholesky_ex(eq.gram + ridge * eye)
    if bool((info != 0).any()):
        return solve_grid(stats, [ridge])[0]
    return _assemble(eq, torch.cholesky_solve(eq.rhs, factor), ridge)


def solve_grid(stats: Stats, ridges: Sequence[float]) -> list[Probe]:
    """One probe per ridge from one eigendecomposition: ``V diag(1 / (e + lambda)) V^T X~^T Y``."""
    if not ridges or not all(r > 0 for r in ridges):
        raise HarnessError(f"every ridge must be positive, got {list(ridges)}")
    eq = normal_equations(stats)
    eigs, vecs = torch.linalg.eigh(eq.gram)
    projected = vecs.transpose(1, 2) @ eq.rhs
    return [_assemble(eq, vecs @ (projected / (eigs.clamp_min(0) + r)[:, :, None]), r) for r in ridges]


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether the argmax of ``logits`` (G, m, C) is ``labels`` (m,): (G, m) bool."""
    return logits.argmax(-1) == labels.to(logits.device)[None, :]
