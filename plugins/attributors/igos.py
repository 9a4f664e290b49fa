"""I-GOS (Qi, Khorram, Li Fuxin, AAAI 2020): a coarse mask optimised with integrated gradients.

Minimises ``l1 * mean|1 - m| + tv * TV_2(m) + score(x * M + base * (1 - M))`` over a G x G mask m
(M = its ``align_corners=True`` bilinear upsampling) by gradient steps whose gradient of the score
term is integrated over ``integration_points`` masks ``(k / K) * M`` with Gaussian input noise, and
whose step size comes from an Armijo backtracking line search (start 200, decay 0.2, alpha 1e-4;
as in the published code, the search multiplies the step, evaluates it and gives up once the step
is below 1e-5, keeping that last step); m is clamped to [0, 1]. Low mask values mark important
cells; the returned map is ``1 - M``.

With SAG's settings (2 iterations from m = 1) the line search usually gives up and the mask moves by
about 1e-2 at most, and every cell whose gradient pushes it up stays clamped at exactly 1: the
published ranking of those cells is whatever ``np.argsort`` makes of the ties. ``ranking="unclamped"``
(the default) ranks by ``1 - (m - step * grad)`` before the last clamp instead, which keeps the order
of every cell strictly inside (0, 1) and orders the clamped ones by how hard their last gradient
pushed them; ``ranking="clamped"`` returns the published ``1 - m``.

All integration points of all images are evaluated in batched forward+backward passes, and the line
search evaluates the still-searching images together.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.components import Attributor, Options
from harness.model import LoadedModel
from harness.scoring import target_scores


class IGOSOptions(Options):
    iterations: int = Field(2, ge=1)
    """Gradient steps (2 in SAG's ranking heuristic; 15 in the older I-GOS release)."""
    grid: int = Field(7, ge=2)
    integration_points: int = Field(20, ge=1)
    l1: float = 1.0
    tv: float = 20.0
    tv_beta: float = 2.0
    noise_std: float = Field(0.2, ge=0)
    noise: Literal["all_channels", "reference"] = "all_channels"
    """all_channels: N(0, noise_std^2) on every channel (the intent); reference: the released code's
    effect, N(0, (2 * noise_std)^2) on the first channel only."""
    baseline: Literal["black", "blur", "mean"] = "black"
    """What masked-out pixels become: black (SAG's I-GOS, the default), Gaussian blur (kernel 11, sigma 5), or the mean colour."""
    line_search_start: float = 200.0
    line_search_decay: float = 0.2
    armijo_alpha: float = 1e-4
    score: Literal["softmax", "logit"] = "softmax"
    ranking: Literal["unclamped", "clamped"] = "unclamped"
    """What ``coarse`` returns: 1 - the last update before its clamp (ties at m = 1 broken by the
    gradient), or the published 1 - m (every cell clamped at 1 tied at 0)."""


def tv_norm(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-image total variation: mean |vertical diff|^beta + mean |horizontal diff|^beta."""
    rows = (mask[..., :-1, :] - mask[..., 1:, :]).abs().pow(beta).flatten(1).mean(1)
    cols = (mask[..., :, :-1] - mask[..., :, 1:]).abs().pow(beta).flatten(1).mean(1)
    return rows + cols


def igos_masks(
    model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int], o: IGOSOptions, clamp_last: bool = True
) -> torch.Tensor:
    """(B, grid, grid) optimised masks (values in [0, 1], low = important).

    ``clamp_last=False`` returns, in float64, the last update before its clamp (values may leave
    [0, 1]), from a float64 copy of the mask that takes the same steps: with SAG's settings the
    steps are often so small (4e-6 x a gradient of 1e-2) that the float32 mask rounds them away at 1.
    """
    from harness_plugins.maskers.fills import gaussian_blur

    n_images, _, height, width = inputs.shape
    if o.baseline == "blur":
        base = gaussian_blur(inputs, 11, 5.0)
    elif o.baseline == "black":
        base = model.normalise(torch.zeros_like(inputs))
    else:
        base = torch.zeros_like(inputs)
    up = lambda m: F.interpolate(m, size=(height, width), mode="bilinear", align_corners=True)  # noqa: E731
    mask = torch.ones(n_images, 1, o.grid, o.grid, device=inputs.device)
    shadow = mask.double()
    k = o.integration_points
    fractions = (torch.arange(1, k + 1, dtype=torch.float32, device=inputs.device) / k).view(-1, 1, 1, 1)
    net = model.forward_module()

    def regulariser(m: torch.Tensor) -> torch.Tensor:
        return o.l1 * (1 - m).abs().flatten(1).mean(1) + o.tv * tv_norm(m, o.tv_beta)

    def score_of(m: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        composite = inputs[rows] * up(m) + base[rows] * (1 - up(m))
        with torch.inference_mode():
            return torch.cat([
                target_scores(net(composite[a : a + model.batch_size]), target[rows][a : a + model.batch_size], o.score)
                for a in range(0, len(rows), model.batch_size)
            ])

    for iteration in range(o.iterations):
        noise = _noise(seeds, iteration, k, inputs, o)
        grad = torch.zeros_like(mask)
        total = n_images * k
        for start in range(0, total, model.batch_size):
            rows = torch.arange(start, min(total, start + model.batch_size), device=inputs.device)
            image, point = rows // k, rows % k
            m = mask.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                integ = fractions[point] * up(m)[image]
                composite = inputs[image] * integ + base[image] * (1 - integ) + noise[image, point]
                scores = target_scores(net(composite), target[image], o.score)
                (g,) = torch.autograd.grad(scores.sum() / k, m)
            grad += g
        with torch.enable_grad():
            m = mask.detach().clone().requires_grad_(True)
            (g_reg,) = torch.autograd.grad(regulariser(m).sum(), m)
        grad += g_reg

        all_rows = torch.arange(n_images, device=inputs.device)
        loss_now = regulariser(mask) + score_of(mask, all_rows)
        decrease = o.armijo_alpha * grad.pow(2).flatten(1).sum(1)
        step = torch.full((n_images,), o.line_search_start, device=inputs.device)
        active = torch.ones(n_images, dtype=torch.bool, device=inputs.device)
        while active.any():
            rows = active.nonzero().squeeze(1)
            trial = (mask[rows] - step[rows].view(-1, 1, 1, 1) * grad[rows]).clamp(0, 1)
            loss_trial = regulariser(trial) + score_of(trial, rows)
            done = loss_trial <= loss_now[rows] - step[rows] * decrease[rows]
            # the published loop: a failed step is multiplied by the decay and evaluated; once the
            # step is below 1e-5 that evaluation is the last and its step is kept, accepted or not
            given_up = (step[rows] < 1e-5) & ~done
            active[rows[done | given_up]] = False
            retry = rows[~done & ~given_up]
            step[retry] = step[retry] * o.line_search_decay
        mask = (mask - step.view(-1, 1, 1, 1) * grad).clamp(0, 1)
        update = shadow - step.double().view(-1, 1, 1, 1) * grad.double()
        shadow = update.clamp(0, 1)
    if not clamp_last:
        return update[:, 0]
    return mask[:, 0]


def _noise(seeds: Sequence[int], iteration: int, points: int, inputs: torch.Tensor, o: IGOSOptions) -> torch.Tensor:
    """(B, K, 3, H, W) Gaussian input noise, seeded per sample and iteration."""
    shape = (points, *inputs.shape[1:])
    out = []
    for seed in seeds:
        gen = torch.Generator().manual_seed((int(seed) + 7919 * (iteration + 1)) & (2**63 - 1))
        if o.noise == "all_channels":
            out.append(o.noise_std * torch.randn(shape, generator=gen))
        else:
            first = torch.zeros(shape)
            first[:, 0] = 2 * o.noise_std * torch.randn((points, *inputs.shape[2:]), generator=gen)
            out.append(first)
    return torch.stack(out).to(inputs.device)


class IGOS(Attributor):
    """I-GOS: 1 - an optimised G x G mask (2 iterations, 20 integration points, l1 = 1, tv = 20, black baseline)."""

    id: ClassVar[str] = "igos"
    version: ClassVar[str] = "2"
    Options = IGOSOptions

    def coarse(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """(B, G, G) importance ``1 - m`` on the grid itself (what SAG ranks its candidates by)."""
        return 1 - igos_masks(model, inputs, target, seeds, self.options, clamp_last=self.options.ranking == "clamped")

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        importance = self.coarse(model, inputs, target, seeds).unsqueeze(1).float()
        return F.interpolate(importance, size=inputs.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
