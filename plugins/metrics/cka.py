"""Minibatch CKA heatmaps (Kornblith et al. 2019; Nguyen, Raghu, Kornblith 2021; Raghu et al. 2021).

Per minibatch of ``n`` images, every selected layer's activation (flattened to ``(n, p)``, minus a
constant feature vector of the minibatch, in float32 or float64 with autocast off) becomes a gram
matrix ``K = X X^T`` inside the forward hook; the activation itself is never kept (nor copied whole).
Each gram is U-centred in float64 and the
unbiased ``HSIC_1(K, L) = <K~, L~> / (n (n - 3))`` of every layer pair is accumulated with one GEMM
per chunk (all batches of a chunk and all layer pairs at once). CKA is
``sum HSIC_1(K, L) / sqrt(sum HSIC_1(K, K) * sum HSIC_1(L, L))``, the ratio taken once at the end.

Records carry the HSIC sums of each chunk (on the chunk's first record), so ``summarize`` works from
the samples file alone: ``--resume`` and merging the samples files of several processes give the
same numbers as one uninterrupted run.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, cast

import torch
from pydantic import Field, field_validator

import harness
from harness.components import Metric, Options, Summary
from harness.errors import HarnessError

from .layers import LayerHooks, default_layers, no_autocast, resolve_layers, short_label, split_patterns

CITATION = (
    "Kornblith, Norouzi, Lee, Hinton. Similarity of Neural Network Representations Revisited. ICML 2019; "
    "Nguyen, Raghu, Kornblith. Do Wide and Deep Networks Learn the Same Things? ICLR 2021; "
    "Raghu, Unterthiner, Kornblith, Zhang, Dosovitskiy. Do Vision Transformers See Like Convolutional "
    "Neural Networks? NeurIPS 2021"
)


# -- the estimator ------------------------------------------------------------------------------------------
CHUNK_ELEMENTS = 1 << 23  # feature-chunk size of the centring buffer (32 MB in float32)


class Workspace:
    """Reusable buffers for :func:`gram` (no per-layer allocations, so no heap fragmentation)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device, tag: str) -> torch.Tensor:
        key = (tag, dtype, str(device))
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def reserve(self, n: int, dtype: torch.dtype, device: torch.device, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        """Allocate :func:`gram`'s buffers for minibatches of ``n`` before a forward pass starts."""
        step = max(1, chunk_elements // max(1, n))
        self.get(n * step, dtype, device, "centred")
        self.get(n * n, dtype, device, "product")


def gram(activation: torch.Tensor, dtype: torch.dtype = torch.float32, chunk_elements: int = CHUNK_ELEMENTS,
         workspace: Workspace | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``X X^T`` (float64) of an activation flattened to (n, p), after removing a common feature offset.

    Each feature has the first image's value subtracted (a constant vector per minibatch, like the
    minibatch mean: U-centring removes either exactly, so no HSIC_1 changes, but float32 no longer
    loses the signal under a large common offset; the difference of two nearby float32 values is
    exact, and it takes one pass over the activation where the mean takes two). Features are
    processed in column chunks of at most ``chunk_elements`` values, centred into a reused buffer
    (the activation is never copied whole), and the partial grams are summed in float64 into
    ``out`` (n, n) when given. With a workspace and ``out`` nothing is allocated: small long-lived
    allocations made while the forward pass allocates and frees large activations fragment the heap
    (measured: +250 MB peak RSS on ViT-S).
    """
    x = activation.detach().reshape(activation.shape[0], -1)
    n, p = x.shape
    step = max(1, min(p, chunk_elements // max(1, n)))
    ws = workspace or Workspace()
    out = torch.zeros(n, n, dtype=torch.float64, device=x.device) if out is None else out.zero_()
    product = ws.get(n * n, dtype, x.device, "product").view(n, n)
    for start in range(0, p, step):
        part = x[:, start : start + step]
        width = part.shape[1]
        centred = torch.sub(part, part[:1], out=ws.get(n * width, dtype, x.device, "centred").view(n, width))
        out += torch.mm(centred, centred.T, out=product)
    return out


def u_centre(k: torch.Tensor) -> torch.Tensor:
    """U-centre gram matrices (..., n, n): zero diagonal, unbiased row/column/total mean removal.

    ``(u_centre(K) * u_centre(L)).sum() / (n (n - 3))`` is the unbiased HSIC_1 of Song et al. 2012.
    """
    n = k.shape[-1]
    if n < 4:
        raise HarnessError(f"unbiased HSIC needs minibatches of at least 4 images, got {n}")
    k = k.to(torch.float64).clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    rows = k.sum(-1, keepdim=True) / (n - 2)
    total = k.sum((-2, -1), keepdim=True) / ((n - 1) * (n - 2))
    u = k - rows - rows.transpose(-2, -1) + total
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u


def centred_batches(grams: torch.Tensor, batches: torch.Tensor) -> torch.Tensor:
    """U-centred grams of ``batches`` (nb, n) indexed into chunk grams (L, c, c), flattened to (L, nb*n*n)."""
    nb, n = batches.shape
    sub = grams[:, batches[:, :, None], batches[:, None, :]]  # (L, nb, n, n)
    return u_centre(sub).reshape(grams.shape[0], nb * n * n)


def cka_matrix(cross: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> torch.Tensor:
    """CKA from accumulated HSIC sums; NaN where a self-HSIC is not positive (undefined, not clamped)."""
    denom = torch.sqrt(self_a.clamp_min(0)[:, None] * self_b.clamp_min(0)[None, :])
    out = cross / denom
    bad = (self_a <= 0)[:, None] | (self_b <= 0)[None, :]
    return out.masked_fill(bad, math.nan)


def headline(matrix: torch.Tensor, same: bool) -> float:
    """Self: mean off-diagonal CKA. Cross: mean over A's layers of the best-matching B layer."""
    m = matrix.clone()
    if same:
        m.fill_diagonal_(math.nan)
        vals = m[torch.isfinite(m)]
        return float(vals.mean()) if vals.numel() else math.nan
    m = torch.where(torch.isfinite(m), m, torch.full_like(m, -math.inf))
    best = m.max(1).values
    best = best[torch.isfinite(best)]
    return float(best.mean()) if best.numel() else math.nan


# -- chunks in records (shared with spatial_localisation) ---------------------------------------------------
def minibatch_plan(n: int, c: int) -> tuple[int, int, int]:
    """(full minibatches, minibatch size used, batches computed) for a chunk of ``c`` images, minibatch ``n``.

    A chunk smaller than one minibatch (the last one, or all the data) is computed as one batch of its
    own size (if >= 4); :func:`collect_chunks` uses such chunks only when the run has no full minibatch.
    """
    nb = c // n
    return (nb, n, nb) if nb else (0, c, 1 if c >= 4 else 0)


def chunk_records(chunk: dict[str, Any] | None, prediction: list[Any], n: int, nb: int) -> list[dict[str, Any]]:
    """One record per image of a chunk; the first carries the chunk's sums (``chunk``)."""
    records = []
    for k in range(len(prediction)):
        values: dict[str, Any] = {"minibatch": n, "in_batch": k < nb * n}
        if k == 0:
            values["chunk"] = chunk
        records.append({"prediction": prediction[k], "values": values})
    return records


def collect_chunks(records: list[dict[str, Any]], metric: str, label: str,
                   same: Callable[[dict[str, Any]], Any]) -> tuple[list[dict[str, Any]], int, str | None]:
    """(chunks to use, minibatch n, note) from records: full minibatches only, or the small-data fallback.

    ``same(chunk)`` must agree across the chunks used (the layers a run compares).
    """
    sizes = {r["values"].get("minibatch") for r in records}
    if len(sizes) > 1:
        raise HarnessError(
            f"the samples file mixes {label} minibatch sizes {sorted(sizes)}: resume with the same --batch-size "
            "(or -o metric.minibatch) or start a fresh --out"
        )
    n = sizes.pop() if sizes else 0
    chunks = [r["values"]["chunk"] for r in records if r["values"].get("chunk")]
    full = [ch for ch in chunks if not ch.get("partial")]
    note = None
    if not full and chunks:
        used = sum(ch["n"] for ch in chunks)
        note = (f"fewer than {n} images: each chunk of fewer images was used as one minibatch of its own size "
                f"({', '.join(str(ch['n']) for ch in chunks)}; {used} images)")
        full = chunks
    if not full:
        raise HarnessError(
            f"{metric} needs at least one minibatch of 4 or more images (minibatch {n}), got {len(records)} image(s)"
        )
    first = same(full[0])
    for ch in full[1:]:
        if same(ch) != first:
            raise HarnessError(f"the samples file mixes {label} runs over different layers; start a fresh --out")
    return full, n, note


# -- options ------------------------------------------------------------------------------------------------
class CKAOptions(Options):
    layers: list[str] = ["default"]
    """Glob patterns over module names (comma-separated), or the keywords ``default`` / ``blocks``."""
    layers_b: list[str] | None = None
    """Patterns for the second (and further) model; unset = the same as ``layers``."""
    minibatch: int | None = Field(None, ge=4)
    """Images per CKA minibatch n (fixed; the last partial batch is dropped). Unset = --batch-size."""
    repeats: int = Field(1, ge=1)
    """Batchings averaged: repeat 0 takes consecutive images, repeat r > 0 a seeded reshuffle within each pool."""
    pool: int = Field(4, ge=1)
    """Minibatches per reshuffle pool when repeats > 1 (the forward pass runs on pool * n images)."""
    gram_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the gram GEMM (after per-batch offset removal); its accumulation, U-centring and sums are float64."""

    @field_validator("layers", "layers_b", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return None if value is None else split_patterns(value)


# -- the metric ---------------------------------------------------------------------------------------------
class CKA(Metric):
    """Minibatch unbiased CKA layer x layer heatmap: one model (self-similarity) or two (cross-model).

    value: one model -> the mean off-diagonal CKA (how uniform the representations are across depth;
    Raghu et al.: high for ViTs, block-structured for ResNets); two models -> the mean over model A's
    layers of the best-matching layer of model B. values: ``cka`` (L_a x L_b, null = undefined),
    ``layers_a``, ``layers_b`` (execution order), ``minibatch``, ``batches``, ``images_used``,
    ``images_dropped``, ``repeats``, ``cka_std`` (over repeats), ``undefined`` (reasons), ``note``.
    stderr: jackknife over chunks (leave one chunk of images out) of the headline; null with one chunk.

    Batching: the runner hands ``minibatch`` images per call (``pool * minibatch`` with repeats > 1);
    consecutive runs of ``minibatch`` images form the minibatches of repeat 0 and a final partial
    batch is dropped. Repeat r > 0 reshuffles the images of each pool with a seed derived from
    ``--seed`` and the pool's sample ids (deterministic, resumable); its grams are sub-blocks of the
    pool's gram, so repeats cost no extra forward pass. If the whole run has fewer images than one
    minibatch (e.g. the 4 bundled samples at --batch-size 32), each such chunk (>= 4 images) is used as
    one minibatch of its own size, with a ``note``. The run id does not include --batch-size: set
    ``-o metric.minibatch=N`` to make n part of the result's identity (a resume with another n is refused).
    """

    id: ClassVar[str] = "cka"
    version: ClassVar[str] = "1"
    higher_is_better: ClassVar[bool | None] = None
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = 2
    citation: ClassVar[str] = CITATION
    Options = CKAOptions

    def __init__(self, options: CKAOptions | None = None):
        super().__init__(options)
        self._layers: dict[int, list[str]] = {}
        self._workspace = Workspace()

    @classmethod
    def default_layers(cls, module: torch.nn.Module) -> list[str]:
        """The layers ``-o metric.layers=default`` selects (for ``harness list layers``)."""
        return default_layers(module)

    # which model pairs a run compares: (i, j) indices into ctx.models
    def pairs(self, n_models: int) -> list[tuple[int, int]]:
        return [(0, 0)] if n_models == 1 else [(0, 1)]

    def _n(self, requested: int) -> int:
        return int(self.options.minibatch or requested)

    def images_per_batch(self, requested: int) -> int:
        n = self._n(requested)
        return n * (self.options.pool if self.options.repeats > 1 else 1)

    def _patterns(self, index: int) -> list[str]:
        if index > 0 and self.options.layers_b is not None:
            return list(self.options.layers_b)
        return list(self.options.layers)

    def _chunk_grams(self, model, index: int, inputs: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Run ``model`` on ``inputs`` with gram hooks: (layer names in execution order, grams (L, c, c), output)."""
        root = model.module
        if index not in self._layers:
            self._layers[index] = resolve_layers(model, self._patterns(index))
        layers = self._layers[index]
        c = inputs.shape[0]
        dtype = torch.float64 if self.options.gram_dtype == "float64" else torch.float32
        grams = torch.zeros(len(layers), c, c, dtype=torch.float64, device=inputs.device)  # allocated before the forward
        self._workspace.reserve(c, dtype, inputs.device)

        def on_activation(i: int, t: torch.Tensor) -> None:
            if t.dim() == 0 or t.shape[0] != c:
                raise HarnessError(
                    f"layer {layers[i]!r} of {model.id} has leading size {tuple(t.shape)[:1]}, not the batch size {c}; "
                    "choose a layer whose output is per image"
                )
            with no_autocast(t.device):
                gram(t, dtype, workspace=self._workspace, out=grams[i])

        hooks = LayerHooks(root, layers, on_activation)
        with torch.inference_mode(), hooks:
            output = root(inputs)
        hooks.check_once()
        order = hooks.order
        return [layers[i] for i in order], grams[order], output

    def _permutation(self, ctx, ids: list[str], repeat: int, c: int) -> torch.Tensor:
        if repeat == 0:
            return torch.arange(c)
        digest = hashlib.sha256(f"{ctx.seed}:cka:{repeat}:{'|'.join(ids)}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        return torch.randperm(c, generator=gen)

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        n = self._n(ctx.batch_size)
        c = len(batch)
        nb, size, batches_here = minibatch_plan(n, c)
        ids = [s.id for s in batch.samples]
        names, chunk_grams, prediction = [], [], [None] * c
        chunk: dict[str, Any] | None = None
        if batches_here:
            for index, model in enumerate(ctx.models):
                layers, grams, output = self._chunk_grams(model, index, batch.inputs(model))
                names.append(layers)
                chunk_grams.append(grams.cpu())
                if index == 0 and isinstance(output, torch.Tensor) and output.dim() == 2:
                    prediction = output.argmax(1).tolist()
            pairs = self.pairs(len(ctx.models))
            repeats = self.options.repeats
            self_sums = [torch.zeros(repeats, g.shape[0], dtype=torch.float64) for g in chunk_grams]
            pair_sums = [torch.zeros(repeats, chunk_grams[i].shape[0], chunk_grams[j].shape[0], dtype=torch.float64) for i, j in pairs]
            scale = 1.0 / (size * (size - 3))
            for r in range(repeats):
                batches = self._permutation(ctx, ids, r, c)[: batches_here * size].view(batches_here, size)
                centred = [centred_batches(g, batches) for g in chunk_grams]
                for m, u in enumerate(centred):
                    self_sums[m][r] = (u * u).sum(1) * scale
                for p, (i, j) in enumerate(pairs):
                    pair_sums[p][r] = (centred[i] @ centred[j].T) * scale  # one GEMM: all batches, all pairs
            chunk = {
                "layers": names,
                "batches": batches_here,
                "n": size,
                "partial": not nb,
                "hsic_self": [s.tolist() for s in self_sums],
                "hsic_pairs": [s.tolist() for s in pair_sums],
            }
        return chunk_records(chunk, prediction, n, nb)

    # -- summary ------------------------------------------------------------------------------------------
    def _collect(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, str | None]:
        """(chunks to use, minibatch n, note): full minibatches only, or the small-data fallback."""
        return collect_chunks(records, "cka", "CKA", lambda ch: ch["layers"])

    @staticmethod
    def _tensors(chunks: list[dict[str, Any]]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Per chunk: self sums per model (R, L_m) and pair sums per pair (R, L_i, L_j), as float64 tensors."""
        selfs = [[torch.tensor(x, dtype=torch.float64) for x in ch["hsic_self"]] for ch in chunks]
        pairs = [[torch.tensor(x, dtype=torch.float64) for x in ch["hsic_pairs"]] for ch in chunks]
        return selfs, pairs

    def _matrices(self, selfs, pairs_sums, pairs) -> list[torch.Tensor]:
        """Per pair: CKA per repeat (R, L_i, L_j)."""
        return [
            torch.stack([cka_matrix(s[r], selfs[i][r], selfs[j][r]) for r in range(s.shape[0])])
            for s, (i, j) in zip(pairs_sums, pairs)
        ]

    def summarize(self, records, ctx) -> Summary:
        chunks, n, note = self._collect(records)
        model_ids = [m.id for m in ctx.models]
        pairs = self.pairs(len(model_ids))
        layers = chunks[0]["layers"]
        chunk_selfs, chunk_pairs = self._tensors(chunks)
        selfs = [cast(torch.Tensor, sum(c[m] for c in chunk_selfs)) for m in range(len(chunk_selfs[0]))]
        pair_sums = [sum(c[p] for c in chunk_pairs) for p in range(len(chunk_pairs[0]))]
        per_repeat = self._matrices(selfs, pair_sums, pairs)
        means = [m.mean(0) for m in per_repeat]
        heads = [headline(m, i == j) for m, (i, j) in zip(means, pairs)]
        value = _nanmean(heads)

        stderr = None  # jackknife over chunks (leave one chunk out)
        if len(chunks) >= 2:
            thetas = []
            for k in range(len(chunks)):
                s_k = [s - c for s, c in zip(selfs, chunk_selfs[k])]
                p_k = [p - c for p, c in zip(pair_sums, chunk_pairs[k])]
                mats = self._matrices(s_k, p_k, pairs)
                thetas.append(_nanmean([headline(m.mean(0), i == j) for m, (i, j) in zip(mats, pairs)]))
            t = torch.tensor(thetas, dtype=torch.float64)
            t = t[torch.isfinite(t)]
            if t.numel() >= 2:
                k = t.numel()
                stderr = float(math.sqrt((k - 1) / k * float(((t - t.mean()) ** 2).sum())))

        undefined = []
        for m, s in enumerate(selfs):
            for layer, lo in zip(layers[m], s.min(0).values.tolist()):
                if not lo > 0:
                    undefined.append({
                        "model": model_ids[m], "layer": layer,
                        "reason": f"self-HSIC sum {lo:.3g} <= 0 (constant or degenerate features, or too few images): CKA undefined",
                    })
        batches = sum(ch["batches"] for ch in chunks)
        used = sum(ch["batches"] * ch.get("n", n) for ch in chunks)
        if note is not None:
            n = chunks[0]["n"] if len({ch["n"] for ch in chunks}) == 1 else n
        values: dict[str, Any] = {
            "minibatch": n,
            "batches": batches,
            "images_used": used,
            "images_dropped": len(records) - used,
            "repeats": self.options.repeats,
            "undefined": undefined,
            "note": note,
            "headline": (
                "mean off-diagonal CKA" if pairs == [(0, 0)]
                else "mean over layers of A of the best CKA with a layer of B" + (" (mean over pairs)" if len(pairs) > 1 else "")
            ),
        }
        pair_entries = []
        for (i, j), mean, per_r, head in zip(pairs, means, per_repeat, heads):
            entry = {"a": model_ids[i], "b": model_ids[j], "layers_a": layers[i], "layers_b": layers[j],
                     "cka": mean.tolist(), "value": head}
            if self.options.repeats > 1:
                entry["cka_std"] = per_r.std(0).tolist()
            pair_entries.append(entry)
        if len(pair_entries) == 1:
            values.update({k: v for k, v in pair_entries[0].items() if k not in ("a", "b", "value")})
        if len(pair_entries) > 1 or self.min_models >= 2:
            values["pairs"] = pair_entries
        values["hsic_self"] = [s.mean(0).tolist() for s in selfs]  # per model (--model order), per layer

        artifacts = {}
        random_init = [m.random_init for m in ctx.models]
        names = _artifact_names(pair_entries)
        for entry, (i, j), name in zip(pair_entries, pairs, names):
            path, relative = ctx.artifact(name)
            draw_heatmap(path, entry, random_init=(random_init[i], random_init[j]), n=n, batches=batches)
            artifacts[name.rsplit(".", 1)[0]] = relative
        return Summary(value=value, stderr=stderr, values=values, artifacts=artifacts)

    def plot(self, result, records, out_dir: Path) -> dict[str, str]:
        values = result.values
        entries = values.get("pairs") or [{
            "a": result.models[0].id, "b": result.models[-1].id, "cka": values["cka"],
            "layers_a": values["layers_a"], "layers_b": values["layers_b"],
        }]
        random = {m.id: m.random_init for m in result.models}
        written = {}
        for entry, name in zip(entries, _artifact_names(entries)):
            path = Path(out_dir) / result.run_id / name
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_heatmap(path, entry, random_init=(random.get(entry["a"], False), random.get(entry["b"], False)),
                         n=values.get("minibatch"), batches=values.get("batches"))
            written[name.rsplit(".", 1)[0]] = f"{result.run_id}/{name}"
        return written


class CKACross(CKA):
    """Minibatch unbiased CKA between every pair of the given models (for suites: all models in one run).

    Each model runs once per batch; the cross heatmap of every unordered pair (A_i, A_j), i < j in
    --model order, is accumulated. value: the mean over pairs of each pair's headline (mean over A's
    layers of the best-matching B layer). values: ``pairs`` = [{a, b, layers_a, layers_b, cka, value}]
    (with exactly two models also ``cka``, ``layers_a``, ``layers_b`` at the top level).
    """

    id: ClassVar[str] = "cka_cross"
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = None

    def pairs(self, n_models: int) -> list[tuple[int, int]]:
        return [(i, j) for i in range(n_models) for j in range(i + 1, n_models)]


def _nanmean(xs: list[float]) -> float:
    good = [x for x in xs if math.isfinite(x)]
    return sum(good) / len(good) if good else math.nan


def _artifact_names(entries: list[dict[str, Any]]) -> list[str]:
    """``cka.png`` for one heatmap, else ``cka_<a>_vs_<b>.png`` (numbered if a pair repeats)."""
    if len(entries) == 1:
        return ["cka.png"]
    safe = lambda s: "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)  # noqa: E731
    names: list[str] = []
    for k, entry in enumerate(entries):
        name = f"cka_{safe(entry['a'])}_vs_{safe(entry['b'])}"
        names.append(f"{name}_{k}.png" if f"{name}.png" in names else f"{name}.png")
    return names


def _ticks(labels: list[str], limit: int = 48) -> tuple[list[int], list[str]]:
    step = max(1, math.ceil(len(labels) / limit))
    idx = list(range(0, len(labels), step))
    return idx, [short_label(labels[i]) for i in idx]


def draw_heatmap(path: Path, entry: dict[str, Any], *, random_init=(False, False), n=None, batches=None) -> None:
    """The CKA matrix with layer names on both axes (rows: model A bottom-up, columns: model B)."""
    import numpy as np

    from harness.plotting import pyplot

    plt = pyplot()
    matrix = np.array([[np.nan if v is None else v for v in row] for row in entry["cka"]], dtype=float)
    la, lb = entry["layers_a"], entry["layers_b"]
    size = min(16.0, max(5.0, 0.12 * max(len(la), len(lb)) + 3))
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=110)
    cmap = plt.get_cmap("magma").with_extremes(bad="#bbbbbb")
    im = ax.imshow(np.ma.masked_invalid(matrix), origin="lower", cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    font = 7 if max(len(la), len(lb)) <= 30 else 5
    xi, xl = _ticks(lb)
    yi, yl = _ticks(la)
    ax.set_xticks(xi, xl, rotation=90, fontsize=font)
    ax.set_yticks(yi, yl, fontsize=font)
    mark = lambda mid, r: f"{mid} (random init)" if r else mid  # noqa: E731
    a, b = mark(entry["a"], random_init[0]), mark(entry["b"], random_init[1])
    ax.set_ylabel(f"{a} layers", fontsize=8)
    ax.set_xlabel(f"{b} layers", fontsize=8)
    what = f"CKA {a}" if entry["a"] == entry["b"] and la == lb else f"CKA {a} vs {b}"
    detail = f" (n={n}, {batches} batch{'' if batches == 1 else 'es'})" if n else ""
    ax.set_title(what + detail, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@harness.hookimpl
def register_metrics(register):
    register(CKA)
    register(CKACross)
