"""Linear probes per layer (Raghu et al. 2021, Fig. 11 and 13; the ViT paper's closed-form few-shot probe).

For each selected layer and feature choice (``cls``: the class token; ``gap``: the mean of the patch
tokens, for CNNs the spatial mean of the feature map; ``token``: single spatial tokens), a linear
classifier is fitted in closed form on frozen features (:mod:`probe_solver`: big_vision's
regularised least squares onto {-1, 1} targets) and its test accuracy reported against depth.

Fit phase: on its first ``evaluate`` call the metric draws, per seeded repetition, a training split from the
run's labelled samples (k per class, or a fraction of each class), streams those images through the
model once (``MetricContext.load_batches``) and accumulates sufficient statistics per layer x
feature x repetition (``n``, sums, ``X^T X``, ``X^T Y`` in float64: memory does not grow with the
data), solves, and caches the probes in ``<out>/<run id>/linear_probe_fit.pt`` (checked against the
run id and the split; ``--resume`` reuses it). Every evaluated sample's record then holds, for each
repetition in which it is a test sample, how many of each probe's predictions were right (0/1 for
``cls``/``gap``, the number of token positions for ``token``), so ``summarize`` works from the
records alone and resume or merging samples files gives the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, cast

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

import harness
from harness.components import Metric, Options, Summary
from harness.errors import HarnessError

from .layers import (
    LayerHooks,
    block_outputs,
    is_windowed,
    no_autocast,
    prefix_tokens,
    resolve_layers,
    short_label,
    split_patterns,
    transformer_blocks,
    unwrap,
)
from .probe_solver import Probe, Stats, moments, solve, solve_grid

CITATION = (
    "Raghu, Unterthiner, Kornblith, Zhang, Dosovitskiy. Do Vision Transformers See Like Convolutional Neural "
    "Networks? NeurIPS 2021; Dosovitskiy et al. An Image is Worth 16x16 Words. ICLR 2021 (closed-form few-shot probe)"
)
FEATURES = ("cls", "gap", "token")
DEFAULT_SHOTS = 10
SIDECAR = "linear_probe_fit.pt"
TEST, FIT, HOLD = 0, 1, 2  # a sample's role in one repetition


class LinearProbeOptions(Options):
    layers: list[str] = ["blocks"]
    """Glob patterns over module names, or ``default`` / ``blocks`` (as for ``cka``); default: block outputs."""
    features: list[Literal["cls", "gap", "token"]] = ["cls", "gap", "token"]
    """Feature choices: ``cls`` (models with a class token), ``gap`` (mean of patch tokens / spatial mean), ``token``."""
    shots: int | None = Field(None, ge=1)
    """Training images per class (k-shot). Unset (and no train_fraction) = 10."""
    train_fraction: float | None = Field(None, gt=0, lt=1)
    """Instead of shots: this fraction of each class's images (rounded, at least 1, at least 1 left for testing)."""
    repetitions: int = Field(3, ge=1)
    """Seeded repetitions, each with its own split (accuracy: mean over them, stderr across them)."""
    ridge: float = Field(1024.0, gt=0)
    """The fixed lambda (big_vision: 2^10)."""
    ridge_grid: list[float] | None = None
    """If set: lambda chosen per probe and repetition by accuracy on a held-out part of the training split."""
    holdout: float = Field(0.2, gt=0, lt=1)
    """With ridge_grid: fraction of each class's training images held out to choose lambda (at least 1)."""
    token_probe: Literal["shared", "per_position"] = "shared"
    """``shared``: one probe trained on every token as an example; ``per_position``: one probe per position."""
    gemm_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the X^T X product (after removing a fixed per-feature shift); all sums are float64."""
    max_memory_gb: float = Field(4.0, gt=0)
    """Refuse (one line) when the statistics would take more than this."""

    @field_validator("layers", "features", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_patterns(value)

    @field_validator("ridge_grid", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value]
        if isinstance(value, str):
            try:
                return [float(v) for v in split_patterns(value)]
            except ValueError:
                raise ValueError("expected numbers, e.g. -o metric.ridge_grid=[1,32,1024]") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> "LinearProbeOptions":
        if self.shots is not None and self.train_fraction is not None:
            raise ValueError("give shots or train_fraction, not both")
        if self.ridge_grid is not None:
            if not self.ridge_grid or not all(r > 0 for r in self.ridge_grid):
                raise ValueError(f"ridge_grid must be a non-empty list of positive numbers, got {self.ridge_grid}")
        if not self.features:
            raise ValueError("features must name at least one of cls, gap, token")
        return self


# -- the split ------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Per labelled sample id: its class index and its role (TEST / FIT / HOLD) in each repetition."""

    classes: list[int]
    label_index: dict[str, int]
    roles: dict[str, tuple[int, ...]]
    unlabelled: int
    key: str


def _generator(seed: int, repetition: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:linear_probe:{repetition}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def make_split(samples: list[Any], options: LinearProbeOptions, seed: int) -> Split:
    """The seeded training/test split of every repetition (identical on every process)."""
    labelled = [s for s in samples if s.label is not None]
    classes = sorted({int(s.label) for s in labelled})
    if len(classes) < 2:
        what = "no labelled image" if not classes else f"only class {classes[0]}"
        raise HarnessError(f"linear_probe needs labelled images of at least 2 classes, got {what} "
                           "(use a labelled dataset, e.g. --data imagefolder:PATH)")
    members: dict[int, list[str]] = {c: [] for c in classes}
    for s in labelled:
        members[int(s.label)].append(s.id)
    shots = options.shots or DEFAULT_SHOTS
    need = {}
    for c, ids in members.items():
        if options.train_fraction is not None:
            k = min(len(ids) - 1, max(1, round(options.train_fraction * len(ids))))
            if len(ids) < 2:
                raise HarnessError(f"linear_probe: class {c} has 1 labelled image; each class needs at least 2 "
                                   "(1 to train, 1 to test)")
        else:
            k = shots
            if len(ids) < k + 1:
                raise HarnessError(f"linear_probe: class {c} has {len(ids)} labelled image(s); {k}-shot probes need at "
                                   f"least {k + 1} per class (lower -o metric.shots or use -o metric.train_fraction)")
        hold = 0
        if options.ridge_grid is not None:
            hold = max(1, round(options.holdout * k))
            if hold >= k:
                raise HarnessError(f"linear_probe: choosing the ridge needs at least 2 training images per class (class {c} "
                                   f"has {k}); raise -o metric.shots or drop -o metric.ridge_grid")
        need[c] = (k, hold)
    roles = {s.id: [TEST] * options.repetitions for s in labelled}
    for r in range(options.repetitions):
        gen = _generator(seed, r)
        for c, ids in members.items():
            k, hold = need[c]
            order = torch.randperm(len(ids), generator=gen).tolist()
            for rank, i in enumerate(order[:k]):
                roles[ids[i]][r] = HOLD if rank >= k - hold else FIT
    frozen = {i: tuple(v) for i, v in roles.items()}
    digest = hashlib.sha256(json.dumps([classes, sorted(frozen.items())]).encode()).hexdigest()
    column = {c: i for i, c in enumerate(classes)}
    return Split(classes=classes, label_index={s.id: column[int(s.label)] for s in labelled},
                 roles=frozen, unlabelled=len(samples) - len(labelled), key=digest)


# -- features -------------------------------------------------------------------------------------------------
@dataclass
class Shape:
    """How to read one layer's output: its rank, prefix tokens, channels-last, and the class token."""

    prefix: int
    has_cls: bool
    channels_last: bool


def layer_features(t: torch.Tensor, shape: Shape, wanted: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per feature choice: (n, D) for ``cls`` / ``gap``, (n, P, D) for ``token`` (float32, detached).

    Only what ``wanted`` names is formed (a CNN's (n, C, H, W) map is only made token-major for ``token``).
    """
    t = t.detach().float()
    out: dict[str, torch.Tensor] = {}
    if t.dim() == 2:
        if "gap" in wanted:
            out["gap"] = t
        return out
    if t.dim() == 3:  # (n, T, D) tokens
        tokens = t[:, shape.prefix :]
        if shape.has_cls and shape.prefix >= 1 and "cls" in wanted:
            out["cls"] = t[:, 0]
        spatial: tuple[int, ...] = (1,)
    elif t.dim() == 4:  # (n, C, H, W) feature map, or (n, H, W, C) for windowed transformers
        tokens = t.flatten(1, 2) if shape.channels_last else t.flatten(2).transpose(1, 2)  # (n, P, D), a view
        spatial = (1, 2) if shape.channels_last else (2, 3)
    else:
        raise HarnessError(f"linear_probe: a layer output of shape {tuple(t.shape)} is not (n, D), (n, T, D) or (n, C, H, W)")
    if tokens.shape[1] == 0:
        raise HarnessError("linear_probe: a layer has no patch token after the prefix tokens")
    if "gap" in wanted:
        out["gap"] = tokens.mean(1) if t.dim() == 3 else t.mean(spatial)
    if "token" in wanted:
        out["token"] = tokens
    return {f: out[f] for f in FEATURES if f in out}


def as_groups(x: torch.Tensor, per_position: bool) -> tuple[torch.Tensor, int]:
    """Features as (G, m, D) and the examples per sample: cls/gap (1, n, D); shared tokens (1, n*P, D), P
    examples per sample; per-position tokens (P, n, D)."""
    if x.dim() == 2:
        return x[None], 1
    if per_position:
        return x.transpose(0, 1), 1
    return x.reshape(1, -1, x.shape[-1]), x.shape[1]


# -- the metric -----------------------------------------------------------------------------------------------
@dataclass
class Fit:
    """The fitted probes: ``probes[j] = (layer, feature, positions)``; ``models[r][j]``; chosen ridges."""

    probes: list[tuple[str, str, int]]
    models: list[list[Probe]]
    ridge: list[list[float]]
    n_train: list[int]
    key: str
    stacked: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class LinearProbe(Metric):
    """Closed-form linear probes per layer (CLS / GAP / single tokens): test accuracy against depth.

    value: the mean test accuracy (over repetitions) of the probe on the last selected layer, on the
    class token if the model has one, else on the mean of the patch tokens (GAP; for CNNs the spatial
    mean); stderr across repetitions. values: ``layers`` (execution order), ``accuracy`` and
    ``accuracy_stderr`` ({feature: per layer, null where the feature does not exist}),
    ``per_repetition``, ``n_train`` / ``n_test`` per repetition, ``classes``, ``chance``, ``ridge``
    (chosen per feature and layer, mean over repetitions), ``unlabelled`` (samples skipped),
    ``skipped_features``, ``headline``.

    Needs labelled images (``--data imagefolder:PATH``); at least 2 classes and k + 1 images per class.
    The training split is drawn from the run's samples (seeded by ``--seed``); training images are
    forwarded once more in the fit phase, and evaluated like the others but count only where they are
    test images. ``token``: one shared probe trained on every token position as an example and
    evaluated at each position (value: mean accuracy over positions); ``-o metric.token_probe=per_position``
    fits one probe per position (P x D^2 statistics: for small grids only).
    """

    id: ClassVar[str] = "linear_probe"
    version: ClassVar[str] = "1"
    higher_is_better: ClassVar[bool | None] = True
    citation: ClassVar[str] = CITATION
    Options = LinearProbeOptions

    @classmethod
    def default_layers(cls, module: nn.Module) -> list[str]:
        """The layers ``-o metric.layers=blocks`` (the default) selects (for ``harness list layers``)."""
        return block_outputs(module)

    def __init__(self, options: LinearProbeOptions | None = None):
        super().__init__(options)
        self._fit: Fit | None = None
        self._split: Split | None = None
        self._layers: list[str] | None = None
        self._shape_cache: Shape | None = None

    # -- helpers --------------------------------------------------------------------------------------------
    def _shape(self, model: Any) -> Shape:
        """Prefix tokens, class token, and whether 4-D outputs are channels-last (windowed transformers: Swin)."""
        if self._shape_cache is None:
            root = unwrap(model)
            windowed = any(is_windowed(cast(nn.Module, root.get_submodule(b).attn)) for b in transformer_blocks(root))
            self._shape_cache = Shape(prefix=prefix_tokens(root), has_cls=getattr(root, "cls_token", None) is not None,
                                      channels_last=windowed)
        return self._shape_cache

    def _forward(self, model: Any, inputs: torch.Tensor,
                 on_features: Callable[[str, dict[str, torch.Tensor]], None]) -> tuple[list[str], Any]:
        """One forward pass; ``on_features(layer, features)`` inside each hook. (layers in execution order, output)."""
        if self._layers is None:
            self._layers = resolve_layers(model, list(self.options.layers))
        layers = self._layers
        shape = self._shape(model)
        wanted = tuple(self.options.features)
        n = inputs.shape[0]

        def hook(i: int, t: torch.Tensor) -> None:
            if t.dim() == 0 or t.shape[0] != n:
                raise HarnessError(f"layer {layers[i]!r} of {model.id} has leading size {tuple(t.shape)[:1]}, not the batch "
                                   f"size {n}; choose a layer whose output is per image")
            with no_autocast(t.device):
                on_features(layers[i], layer_features(t, shape, wanted))

        hooks = LayerHooks(unwrap(model), layers, hook)
        with torch.inference_mode(), hooks:
            output = unwrap(model)(inputs)
        hooks.check_once()
        return [layers[i] for i in hooks.order], output

    def _gemm_dtype(self) -> torch.dtype:
        return torch.float64 if self.options.gemm_dtype == "float64" else torch.float32

    # -- fit phase ------------------------------------------------------------------------------------------
    def _accumulate(self, ctx: Any, split: Split, reps: int
                    ) -> tuple[list[tuple[str, str, int]], list[list[Stats]], list[list[Stats]], list[int]]:
        """Stream every training image once: statistics per probe, per repetition (fit part, held-out part),
        and the training images read per repetition."""
        model = ctx.models[0]
        per_position = self.options.token_probe == "per_position"
        train = [s for s in ctx.samples if any(r != TEST for r in split.roles.get(s.id, (TEST,)))]
        probes: list[tuple[str, str, int]] = []
        index: dict[tuple[str, str], int] = {}
        fit: list[list[Stats]] = [[] for _ in range(reps)]
        hold: list[list[Stats]] = [[] for _ in range(reps)]
        grid = self.options.ridge_grid is not None
        budget = self.options.max_memory_gb * 2**30
        used = [0]
        classes = len(split.classes)
        dtype = self._gemm_dtype()
        state: dict[str, Any] = {}

        def on_features(layer: str, feats: dict[str, torch.Tensor]) -> None:
            labels = state["labels"]
            for feature, x in feats.items():
                key = (layer, feature)
                if key not in index:
                    positions = x.shape[1] if x.dim() == 3 else 1
                    groups = positions if per_position and x.dim() == 3 else 1
                    dim = x.shape[-1]
                    used[0] += Stats.nbytes(groups, dim, classes) * reps * (2 if grid else 1)
                    if used[0] > budget:
                        raise HarnessError(
                            f"linear_probe: the statistics would take over {self.options.max_memory_gb:g} GB (at layer "
                            f"{layer!r}, {feature}); select fewer layers (-o metric.layers=...), fewer features, or "
                            "token_probe=shared, or raise -o metric.max_memory_gb")
                    shift = (x.reshape(-1, dim).mean(0) if x.dim() == 3 else x.mean(0)).to(dtype).double()
                    index[key] = len(probes)
                    probes.append((layer, feature, positions))
                    for r in range(reps):
                        fit[r].append(Stats(groups, dim, classes, shift, x.device))
                        hold[r].append(Stats(groups, dim, classes, shift, x.device) if grid else fit[r][-1])
                j = index[key]
                for pattern, rows in state["patterns"].items():
                    xs, per = as_groups(x if len(rows) == x.shape[0] else x[rows], per_position)
                    ys = labels[rows].repeat_interleave(per)
                    m = moments(xs, ys, classes, fit[0][j].shift, dtype)
                    for r, role in enumerate(pattern):
                        if role == FIT:
                            fit[r][j].add(m)
                        elif role == HOLD:
                            hold[r][j].add(m)

        n_train = [0] * reps
        read = 0
        for batch in ctx.load_batches(train):
            read += len(batch)
            roles = torch.tensor([split.roles[s.id] for s in batch.samples], dtype=torch.long)
            n_train = [n + int((roles[:, r] != TEST).sum()) for r, n in enumerate(n_train)]
            state["labels"] = torch.tensor([split.label_index[s.id] for s in batch.samples], dtype=torch.long)
            patterns: dict[tuple[int, ...], list[int]] = {}
            for i, row in enumerate(roles.tolist()):
                patterns.setdefault(tuple(row), []).append(i)
            state["patterns"] = {p: torch.tensor(rows) for p, rows in patterns.items()}
            self._forward(model, batch.inputs(model), on_features)
        if not read:
            raise HarnessError("linear_probe: no training image could be read")
        if not probes:
            raise HarnessError(f"linear_probe: none of the features {', '.join(self.options.features)} exists at the selected "
                               "layers (cls needs a class token; gap and token need token or feature-map outputs)")
        return probes, fit, hold, n_train

    def _choose_ridges(self, ctx: Any, split: Split, probes, fit: list[list[Stats]]) -> list[list[float]]:
        """Per repetition and probe: the grid's lambda with the best accuracy on the held-out images (ties: larger)."""
        grid = sorted(float(v) for v in self.options.ridge_grid or [])
        reps = len(fit)
        banks = [[solve_grid(fit[r][j], grid) for j in range(len(probes))] for r in range(reps)]  # [r][j][b]
        stacked = self._stack([[banks[r][j][b] for j in range(len(probes))] for r in range(reps) for b in range(len(grid))])
        hits = torch.zeros(reps, len(probes), len(grid), dtype=torch.float64)
        held = [s for s in ctx.samples if HOLD in split.roles.get(s.id, ())]
        for batch in ctx.load_batches(held):
            labels = torch.tensor([split.label_index[s.id] for s in batch.samples])
            roles = torch.tensor([split.roles[s.id] for s in batch.samples])
            counts, _ = self._count(ctx.models[0], batch, labels, stacked, reps * len(grid), probes)
            counts = counts.view(reps, len(grid), len(probes), -1)  # (R, B, J, n)
            for r in range(reps):
                mask = (roles[:, r] == HOLD).double()
                hits[r] += (counts[r] * mask).sum(-1).T
        best = []
        for r in range(reps):
            row = []
            for j in range(len(probes)):
                top = hits[r, j].max()
                row.append(max(g for g, h in zip(grid, hits[r, j].tolist()) if h == top))
            best.append(row)
        return best

    def _stack(self, banks: list[list[Probe]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per probe j: the folded weights of every bank side by side, (G, D, K*C) and (G, K*C), in the compute dtype."""
        dtype = self._gemm_dtype()
        stacked = []
        for j in range(len(banks[0])):
            folded = [bank[j].folded() for bank in banks]
            stacked.append((torch.cat([a for a, _ in folded], -1).to(dtype), torch.cat([b for _, b in folded], -1).to(dtype)))
        return stacked

    def _count(self, model: Any, batch: Any, labels: torch.Tensor, stacked: list[tuple[torch.Tensor, torch.Tensor]],
               banks: int, probes: list[tuple[str, str, int]]) -> tuple[torch.Tensor, Any]:
        """(correct predictions per bank and probe (banks, J, n) (token: positions right, else 0/1), model output).

        One GEMM per probe for all banks (repetitions, ridges), in ``gemm_dtype``.
        """
        index = {(layer, feature): j for j, (layer, feature, _) in enumerate(probes)}
        n = len(batch)
        out = torch.zeros(banks, len(probes), n, dtype=torch.float64)
        per_position = self.options.token_probe == "per_position"

        def on_features(layer: str, feats: dict[str, torch.Tensor]) -> None:
            for feature, x in feats.items():
                j = index.get((layer, feature))
                if j is None:
                    continue
                a, b = stacked[j]
                xs, per = as_groups(x, per_position)
                logits = torch.baddbmm(b.to(xs.device)[:, None, :], xs.to(a.dtype), a.to(xs.device))  # (G, m, K*C)
                guess = logits.view(*logits.shape[:2], banks, -1).argmax(-1)  # (G, m, K)
                right = guess == labels.to(xs.device).repeat_interleave(per)[None, :, None]
                if per_position and x.dim() == 3:
                    right = right.transpose(0, 1)  # (n, P, K)
                else:
                    right = right.view(n, per, banks)
                out[:, j] = right.sum(1).T.double().cpu()

        _, output = self._forward(model, batch.inputs(model), on_features)
        return out, output

    def _key(self, ctx: Any, split: Split) -> str:
        what = {"run_id": ctx.run_id, "options": self.options.model_dump(mode="json"), "split": split.key, "seed": ctx.seed}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def _ensure_fit(self, ctx: Any) -> Fit:
        if self._fit is not None:
            return self._fit
        if not ctx.samples or ctx.load_batches is None:
            raise HarnessError("linear_probe needs the run's sample list and loader (run it through `harness run`)")
        split = self._split = make_split(ctx.samples, self.options, ctx.seed)
        key = self._key(ctx, split)
        path, _ = ctx.artifact(SIDECAR)
        fit = load_fit(path, key)
        if fit is None:
            fit = self._fit_probes(ctx, split, key)
            save_fit(path, fit)
        fit.stacked = self._stack(fit.models)
        self._fit = fit
        return fit

    def _fit_probes(self, ctx: Any, split: Split, key: str) -> Fit:
        reps = self.options.repetitions
        probes, fit, hold, n_train = self._accumulate(ctx, split, reps)
        grid = self.options.ridge_grid is not None
        if grid:
            ridges = self._choose_ridges(ctx, split, probes, fit)
        else:
            ridges = [[self.options.ridge] * len(probes) for _ in range(reps)]
        models = []
        for r in range(reps):
            row = []
            for j in range(len(probes)):
                stats = fit[r][j].merged(hold[r][j]) if grid else fit[r][j]
                row.append(solve(stats, ridges[r][j]))
            models.append(row)
        return Fit(probes=probes, models=models, ridge=ridges, n_train=n_train, key=key)

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        fit = self._ensure_fit(ctx)
        split = self._split
        assert split is not None
        labels = torch.tensor([split.label_index.get(s.id, -1) for s in batch.samples])
        counts, output = self._count(ctx.models[0], batch, labels.clamp_min(0), fit.stacked, len(fit.models), fit.probes)
        prediction: list[Any] = [None] * len(batch)
        if isinstance(output, torch.Tensor) and output.dim() == 2:
            prediction = output.argmax(1).tolist()
        header = {
            "key": fit.key,
            "probes": [list(p) for p in fit.probes],
            "classes": len(split.classes),
            "n_train": fit.n_train,
            "ridge": fit.ridge,
        }
        records = []
        for k, sample in enumerate(batch.samples):
            values: dict[str, Any] = {}
            if k == 0:
                values["probe"] = header
            roles = split.roles.get(sample.id)
            if roles is None:
                values["skipped"] = "no label"
            else:
                values["label_index"] = int(labels[k])
                values["correct"] = {str(r): [int(c) for c in counts[r, :, k].tolist()]
                                     for r, role in enumerate(roles) if role == TEST}
            records.append({"prediction": prediction[k], "values": values})
        return records

    # -- summary --------------------------------------------------------------------------------------------
    def summarize(self, records, ctx) -> Summary:
        headers = [r["values"]["probe"] for r in records if r["values"].get("probe")]
        if not headers:
            raise HarnessError("linear_probe: no record carries the fitted probes (an incomplete samples file?)")
        if len({h["key"] for h in headers}) > 1:
            raise HarnessError("the samples file mixes linear probes fitted differently; start a fresh --out")
        head = headers[0]
        probes = [tuple(p) for p in head["probes"]]
        reps = len(head["n_train"])
        right = torch.zeros(reps, len(probes), dtype=torch.float64)
        n_test = torch.zeros(reps, dtype=torch.float64)
        unlabelled = 0
        for rec in records:
            entry = rec["values"]
            if entry.get("skipped"):
                unlabelled += 1
            for r, row in (entry.get("correct") or {}).items():
                right[int(r)] += torch.tensor(row, dtype=torch.float64)
                n_test[int(r)] += 1
        if bool((n_test == 0).any()):
            raise HarnessError("linear_probe: a repetition has no test image (every labelled image was used for training)")
        positions = torch.tensor([p[2] for p in probes], dtype=torch.float64)
        acc = right / (n_test[:, None] * positions[None, :])  # (R, J)
        mean = acc.mean(0)
        err = acc.std(0) / math.sqrt(reps) if reps > 1 else None
        layers = list(dict.fromkeys(p[0] for p in probes))
        features = [f for f in FEATURES if any(p[1] == f for p in probes)]
        where = {(p[0], p[1]): j for j, p in enumerate(probes)}
        ridge = torch.tensor(head["ridge"], dtype=torch.float64).mean(0)

        def table(vec: torch.Tensor | None) -> dict[str, list[float | None]]:
            return {f: [None if vec is None or (l, f) not in where else float(vec[where[(l, f)]]) for l in layers]
                    for f in features}

        last = layers[-1]
        chosen = next(f for f in ("cls", "gap", "token") if (last, f) in where)
        j = where[(last, chosen)]
        value = float(mean[j])
        stderr = float(err[j]) if err is not None else None
        skipped = [f for f in self.options.features if f not in features]
        values: dict[str, Any] = {
            "layers": layers,
            "features": features,
            "accuracy": table(mean),
            "accuracy_stderr": table(err),
            "per_repetition": [table(acc[r]) for r in range(reps)],
            "n_train": head["n_train"],
            "n_test": [int(v) for v in n_test.tolist()],
            "classes": head["classes"],
            "chance": 1.0 / head["classes"],
            "ridge": table(ridge),
            "repetitions": reps,
            "shots": None if self.options.train_fraction is not None else (self.options.shots or DEFAULT_SHOTS),
            "train_fraction": self.options.train_fraction,
            "token_probe": self.options.token_probe,
            "unlabelled": unlabelled,
            "skipped_features": skipped,
            "headline": f"test accuracy of the {chosen} probe at {last}",
        }
        path, relative = ctx.artifact("linear_probe.png")
        draw_accuracy(path, values, ctx.models[0].id)
        return Summary(value=value, stderr=stderr, values=values, artifacts={"linear_probe": relative})

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        path = Path(out_dir) / result.run_id / "linear_probe.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_accuracy(path, result.values, result.models[0].id)
        return {"linear_probe": f"{result.run_id}/linear_probe.png"}


# -- the sidecar ----------------------------------------------------------------------------------------------
def save_fit(path: Path, fit: Fit) -> None:
    """Write the fitted probes (torch.save of tensors and plain lists; read back with weights_only)."""
    data = {
        "format": 1, "key": fit.key, "probes": [list(p) for p in fit.probes], "ridge": fit.ridge, "n_train": fit.n_train,
        "mean": [[p.mean.cpu() for p in row] for row in fit.models],
        "std": [[p.std.cpu() for p in row] for row in fit.models],
        "w": [[p.w.cpu() for p in row] for row in fit.models],
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_fit(path: Path, key: str) -> Fit | None:
    """The cached probes if ``path`` holds those of this run and split (else None: fit again)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format") != 1 or data.get("key") != key:
            return None
        models = [[Probe(mean=m, std=s, w=w) for m, s, w in zip(*rows)] for rows in zip(data["mean"], data["std"], data["w"])]
        return Fit(probes=[(str(a), str(b), int(c)) for a, b, c in data["probes"]], models=models,
                   ridge=[[float(v) for v in row] for row in data["ridge"]], n_train=[int(v) for v in data["n_train"]], key=key)
    except Exception:  # a damaged or foreign file: fit again
        return None


# -- the plot -------------------------------------------------------------------------------------------------
def draw_accuracy(path: Path, values: dict[str, Any], model_id: str) -> None:
    """Test accuracy against depth, one line per feature choice (error bars: stderr across repetitions)."""
    from harness.plotting import pyplot

    plt = pyplot()
    layers = values["layers"]
    fig, ax = plt.subplots(figsize=(max(5.0, min(14.0, 0.35 * len(layers) + 3)), 4), dpi=110)
    x = list(range(len(layers)))
    names = {"cls": "CLS token", "gap": "GAP (mean of tokens)", "token": "single tokens (mean over positions)"}
    for feature in values["features"]:
        ys = [math.nan if v is None else v for v in values["accuracy"][feature]]
        es = [0.0 if v is None else v for v in (values.get("accuracy_stderr") or {}).get(feature, [None] * len(x))]
        ax.errorbar(x, ys, yerr=es, marker="o", markersize=3, capsize=2, label=names.get(feature, feature))
    ax.axhline(values["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    step = max(1, math.ceil(len(layers) / 40))
    ax.set_xticks(x[::step], [short_label(layers[i]) for i in x[::step]], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("test accuracy")
    ax.set_xlabel("layer")
    shots = f"{values['shots']}-shot" if values.get("shots") else f"train fraction {values.get('train_fraction')}"
    ax.set_title(f"Linear probes: {model_id} ({values['classes']} classes, {shots}, {values['repetitions']} reps)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@harness.hookimpl
def register_metrics(register):
    register(LinearProbe)
