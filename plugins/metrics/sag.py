"""The SAG search for minimal sufficient explanations (Shitole et al., NeurIPS 2021) and the
sub-explanation count of Jiang, Khorram & Li Fuxin (CVPR 2024), batched across candidates and images.

Each image's search is a generator that yields the patch sets it needs confidences for and receives
them back; :class:`ConfidenceOracle` answers the queries of all images of a batch in shared,
fixed-size forward passes and never evaluates a patch set twice (a cache per image). The generators
therefore express the published sequential procedures exactly, while the evaluation is batched.

Patch sets are sorted tuples of grid-cell indices (row-major). An image with patch set S is
``M * x + (1 - M) * baseline`` where M is the sum of S's bilinear tents (``grid:G``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Generator, Literal, TypeVar

import torch

from harness.batching import map_in_chunks
from harness.model import LoadedModel
from harness.regions import Granularity
from harness.scoring import ScoreKind, target_scores

PatchSet = tuple[int, ...]
Queries = tuple[str, list[PatchSet]]  # (phase, patch sets)
R = TypeVar("R")
Search = Generator[Queries, dict[PatchSet, float], R]  # a search that returns an R


# -- evaluating patch sets ---------------------------------------------------------------------------
@dataclass
class ConfidenceOracle:
    """Confidences of patch sets for a batch of images, cached per image, evaluated in chunks."""

    model: LoadedModel
    inputs: torch.Tensor
    baseline: torch.Tensor
    granularity: Granularity
    target: torch.Tensor
    score: ScoreKind = "softmax"
    chunk_size: int | None = None
    cache: list[dict[PatchSet, float]] = field(init=False)
    passes: list[dict[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.cache = [{} for _ in range(len(self.inputs))]
        self.passes = [{} for _ in range(len(self.inputs))]

    def evaluate(self, queries: list[tuple[int, str, PatchSet]]) -> None:
        """Evaluate every (image, phase, patch set) not cached yet, in forward passes of ``chunk_size``."""
        todo: list[tuple[int, PatchSet]] = []
        seen: set[tuple[int, PatchSet]] = set()
        for image, phase, patches in queries:
            key = (image, patches)
            if patches in self.cache[image] or key in seen:
                continue
            seen.add(key)
            todo.append(key)
            self.passes[image][phase] = self.passes[image].get(phase, 0) + 1
        if not todo:
            return
        n_regions = self.granularity.n_regions
        images = torch.tensor([i for i, _ in todo], device=self.inputs.device)
        keep = torch.zeros(len(todo), n_regions, device=self.inputs.device)
        for row, (_, patches) in enumerate(todo):
            if patches:
                keep[row, list(patches)] = 1.0

        buffer: list[torch.Tensor] = []

        def chunk(start: int, stop: int) -> torch.Tensor:
            # M * x + (1 - M) * baseline, written into a reusable buffer one run of rows of the same
            # image at a time (that image's tensors broadcast over the run; no per-row gathers)
            b = images[start:stop]
            mask = self.granularity.render(keep[start:stop]).to(self.inputs.dtype)
            if not buffer or len(buffer[0]) < stop - start:
                buffer[:] = [torch.empty((stop - start, *self.inputs.shape[1:]), dtype=self.inputs.dtype, device=self.inputs.device)]
            composite = buffer[0][: stop - start]
            row = 0
            for image, run in zip(*(t.tolist() for t in torch.unique_consecutive(b, return_counts=True))):
                weights, segment = mask[row : row + run], composite[row : row + run]
                torch.mul(weights, self.inputs[image], out=segment)
                segment.add_((1 - weights) * self.baseline[image])
                row += run
            return target_scores(forward(composite), self.target[b], self.score)

        forward = self.model.forward_module()
        with torch.inference_mode():
            values = map_in_chunks(len(todo), self.chunk_size or self.model.batch_size, chunk).tolist()
        for (image, patches), value in zip(todo, values):
            self.cache[image][patches] = value

    def drive(self, searches: dict[int, Search[R]]) -> dict[int, R]:
        """Run the searches in lockstep: each round answers all their pending queries at once."""
        results: dict[int, R] = {}
        pending: dict[int, Queries] = {}
        for image, search in searches.items():
            try:
                pending[image] = next(search)
            except StopIteration as stop:
                results[image] = stop.value
        while pending:
            self.evaluate([(i, phase, s) for i, (phase, sets) in pending.items() for s in sets])
            advanced: dict[int, Queries] = {}
            for image, (_, sets) in pending.items():
                try:
                    advanced[image] = searches[image].send({s: self.cache[image][s] for s in sets})
                except StopIteration as stop:
                    results[image] = stop.value
            pending = advanced
        return results


# -- the search -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSettings:
    """SAG's published parameters (beam width: see ``beam_width``; the two protocols: see ``protocol``)."""

    threshold: float = 0.9
    candidates: int = 15
    beam_width: int = 3
    max_roots: int = 10
    max_depth: int = 49
    pruning: Literal["batched", "sequential"] = "batched"
    speculative_pruning: bool = False
    """Batched pruning only: evaluate windows of removals per round (fewer rounds, more passes; see prune_batched)."""
    protocol: Literal["clean", "sag"] = "clean"
    """``clean``: distinct successors, every sufficient successor pruned into a root, ``beam_width`` members
    kept, pruning stops at one patch. ``sag``: the published ``search.py`` exactly — repeated successors
    kept (a set reached from two beam members fills two slots), the beam filled until it holds
    ``beam_width + 1`` members (the published off-by-one) and sufficient successors ranked below that
    point never examined, pruning allowed down to the empty set."""


@dataclass
class SearchResult:
    """The MSEs (pruned roots) of one image, in the order found, with their confidences."""

    roots: list[PatchSet]
    confidences: dict[PatchSet, float]
    depth: int


def beam_search(ranking: list[int], p0: float, s: SearchSettings) -> Search[SearchResult]:
    """Beam search from the empty set for sufficient patch sets (``p > threshold * p0``), pruned to MSEs.

    Every beam member is extended by each of its ``candidates`` most important unused patches (in
    ``ranking`` order); successors are sorted by confidence, descending (ties: order of generation);
    sufficient ones are pruned into roots, the others fill the next beam. The search stops after the
    depth at which more than ``max_roots`` distinct roots exist, when the beam is empty, or at
    ``max_depth``. ``s.protocol`` chooses between the clean protocol and the published one (see
    :class:`SearchSettings`); either way a patch set is evaluated once (the oracle caches).
    """
    published = s.protocol == "sag"
    bar = s.threshold * p0
    beam: list[PatchSet] = [()]
    roots: list[PatchSet] = []
    confidences: dict[PatchSet, float] = {}
    depth = 0
    for depth in range(1, s.max_depth + 1):  # noqa: B007 - the depth reached is returned
        successors = _successors(beam, ranking, s.candidates, keep_repeats=published)
        if not successors:
            break
        conf = yield ("search", list(dict.fromkeys(successors)))
        confidences.update(conf)
        order = sorted(range(len(successors)), key=lambda i: (-conf[successors[i]], i))
        sufficient, beam = _split(
            [successors[i] for i in order], conf, bar, s.beam_width + 1 if published else s.beam_width, stop_when_full=published
        )
        if sufficient:
            start = {k: conf[k] for k in sufficient}
            unique = list(dict.fromkeys(sufficient))
            if s.pruning == "batched":
                pruned, pruned_conf = yield from prune_batched(unique, start, bar, s.speculative_pruning, to_empty=published)
            else:
                pruned, pruned_conf = yield from prune_sequential(unique, start, bar, to_empty=published)
            confidences.update(pruned_conf)
            for root in pruned:
                if root not in roots:
                    roots.append(root)
        if len(roots) > s.max_roots or not beam:
            break
    return SearchResult(roots=roots, confidences=confidences, depth=depth)


def _successors(beam: list[PatchSet], ranking: list[int], candidates: int, keep_repeats: bool) -> list[PatchSet]:
    """Each beam member extended by its ``candidates`` best unused patches, in generation order;
    without ``keep_repeats`` a set reached again is dropped."""
    out: list[PatchSet] = []
    for node in beam:
        used = set(node)
        out.extend(tuple(sorted((*node, patch))) for patch in [p for p in ranking if p not in used][:candidates])
    return out if keep_repeats else list(dict.fromkeys(out))


def _split(
    ordered: list[PatchSet], conf: dict[PatchSet, float], bar: float, width: int, stop_when_full: bool
) -> tuple[list[PatchSet], list[PatchSet]]:
    """(sufficient successors to prune, next beam) from successors sorted by confidence.

    ``stop_when_full``: the published loop, which stops reading the sorted list once the beam holds
    ``width`` members (sufficient successors below that point are never examined)."""
    sufficient: list[PatchSet] = []
    beam: list[PatchSet] = []
    for child in ordered:
        if conf[child] > bar:
            sufficient.append(child)
        elif len(beam) < width:
            beam.append(child)
            if stop_when_full and len(beam) == width:
                break
    return sufficient, beam


def prune_sequential(
    sets: list[PatchSet], conf: dict[PatchSet, float], bar: float, to_empty: bool = False
) -> Generator[Queries, dict[PatchSet, float], tuple[list[PatchSet], dict[PatchSet, float]]]:
    """SAG's pruning, one removal at a time: passes over the patches in row-major order, dropping a
    patch whenever the rest stays sufficient, until a pass removes nothing. The last patch is only
    tried when ``to_empty`` (the published code does, so its MSE can be the empty set)."""
    floor = 0 if to_empty else 1
    known = dict(conf)
    out = []
    for current in sets:
        while True:
            removed = False
            for patch in list(current):
                if patch not in current or len(current) == floor:
                    continue
                trial = tuple(p for p in current if p != patch)
                if trial not in known:
                    known.update((yield ("pruning", [trial])))
                if known[trial] > bar:
                    current, removed = trial, True
            if not removed:
                break
        out.append(current)
    return out, known


def prune_batched(
    sets: list[PatchSet], conf: dict[PatchSet, float], bar: float, speculative: bool = False, to_empty: bool = False
) -> Generator[Queries, dict[PatchSet, float], tuple[list[PatchSet], dict[PatchSet, float]]]:
    """The same result as :func:`prune_sequential`, for all ``sets`` at once.

    Every set follows the sequential procedure exactly (passes over its patches in row-major order,
    taking the first removal that stays sufficient), but the sets advance together: each round asks
    for the next undecided removal of every set in one query, so the trials of all sets (and,
    through :class:`ConfidenceOracle`, of all images) share forward passes, and pruning evaluates
    exactly the patch sets sequential pruning evaluates (minus those already known). Decisions that
    known confidences allow (e.g. trials evaluated for another set) are taken without a round.

    ``speculative=True`` trades forward passes for fewer rounds (for devices where a round costs
    about the same at any batch size): each set's round evaluates a window of its next removals,
    all tested against its current set — the first sufficient one is exactly the removal the
    sequential pass would make next, since the removals before it are tested against the same set
    and fail; the window's trials after it are the only extra evaluations. The window starts at one
    trial, doubles after every round without a removal (the final pass that confirms minimality
    takes log2(n) rounds instead of n) and drops back to one after a removal. On a CPU an image
    costs about the same in any batch of 8 or more, so the extra passes cost more than the saved
    rounds: on ``efficientnet_lite0`` and the rocket photo the whole search makes 1,937 passes in
    235 forward calls by default and 2,158 in 170 speculatively (12.0 s vs 14.2 s, 2 CPU cores).
    """
    known = dict(conf)
    floor = 0 if to_empty else 1
    # per set: current set, patches of this pass still to try (row-major), removed in this pass?, window
    state: list[list] = [[s, list(s), False, 1] for s in sets]

    def advance(i: int) -> bool:
        """Apply every decision the known confidences allow; False when set ``i`` is finished."""
        current, todo, removed, window = state[i]
        while True:
            while todo and len(current) > floor:
                trial = tuple(p for p in current if p != todo[0])
                if trial not in known:
                    state[i] = [current, todo, removed, window]
                    return True
                if known[trial] > bar:
                    current, removed = trial, True
                todo = todo[1:]
            if not removed:
                state[i] = [current, [], False, window]
                return False
            todo, removed = list(current), False  # a new pass

    active = [i for i in range(len(state)) if advance(i)]
    while active:
        queries: list[PatchSet] = []
        for i in active:
            current, todo, _, window = state[i]
            queries.extend(t for t in (tuple(p for p in current if p != q) for q in todo[:window]) if t not in known)
        known.update((yield ("pruning", list(dict.fromkeys(queries)))))
        for i in active:
            size = len(state[i][0])
            if advance(i) and speculative:
                state[i][3] = 1 if len(state[i][0]) < size else min(2 * state[i][3], 64)
        active = [i for i in active if state[i][1]]
    return [st[0] for st in state], known


# -- sub-explanations -------------------------------------------------------------------------------
@dataclass
class SubexplanationCount:
    """Relative confidences of the proper subsets of an image's MSEs that were evaluated."""

    relative: dict[PatchSet, float]
    truncated: bool = False
    per_mse_subsets: int = 0
    """Subsets the MSEs have one by one (what counting each MSE on its own would evaluate)."""


def count_subexplanations(mses: list[PatchSet], p0: float, lowest: float, exhaustive_max: int, max_nodes: int) -> Search[SubexplanationCount]:
    """Evaluate the proper non-empty subsets of each MSE, all MSEs of an image together.

    MSEs of at most ``exhaustive_max`` patches: every proper subset. Larger ones: the patch deletion
    tree — children remove one patch, and a node is expanded while its relative confidence is at
    least ``lowest``. A subset shared by several MSEs, or already evaluated by the search, costs no
    forward pass (the oracle's cache); at most ``max_nodes`` subsets per image (then ``truncated``).
    All exhaustive subsets go out in one query and the trees advance one level per query, so the
    forward passes are as full as the batch size allows.
    """
    relative: dict[PatchSet, float] = {}
    truncated = False
    small = [m for m in mses if len(m) <= exhaustive_max]
    large = [m for m in mses if len(m) > exhaustive_max]
    per_mse = sum(2 ** len(m) - 2 for m in small if m)

    def ask(sets: list[PatchSet]) -> list[PatchSet]:
        nonlocal truncated
        fresh = [c for c in dict.fromkeys(sets) if c not in relative]
        if len(relative) + len(fresh) > max_nodes:
            fresh, truncated = fresh[: max(0, max_nodes - len(relative))], True
        return fresh

    subsets = ask([c for m in small for k in range(1, len(m)) for c in combinations(m, k)])
    if subsets:
        conf = yield ("counting", subsets)
        relative.update({k: v / p0 for k, v in conf.items()})
    level = list(dict.fromkeys(large))
    while level and not truncated:
        children = [tuple(p for p in node if p != patch) for node in level for patch in node if len(node) > 1]
        per_mse += len(children)
        fresh = ask(children)
        if fresh:
            conf = yield ("counting", fresh)
            relative.update({k: v / p0 for k, v in conf.items()})
        level = [c for c in dict.fromkeys(children) if c in relative and relative[c] >= lowest]
    return SubexplanationCount(relative=relative, truncated=truncated, per_mse_subsets=per_mse)
