"""SAG search, pruning and sub-explanation counting on models whose answer is known."""

from __future__ import annotations

import itertools
import json
from typing import Callable, ClassVar

import pytest
import torch

from conftest import wrap_module
from harness.components import Attributor
from harness.data import Batch, Sample
from harness.regions import Granularity
from harness.runner import MetricContext
from harness_plugins.maskers.fills import BlackFill
from harness_plugins.metrics.sag import SearchSettings, beam_search, count_subexplanations, prune_batched, prune_sequential
from harness_plugins.metrics.subexplanations import Subexplanations

GRID, SIZE = 7, 25  # tent nodes fall on pixels 0, 4, ..., 24


def drive(search, confidence: Callable[[tuple[int, ...]], float]):
    """Run a search generator against a confidence function; return (result, number of distinct queries)."""
    asked: set[tuple[int, ...]] = set()
    try:
        _, sets = next(search)
        while True:
            asked.update(sets)
            _, sets = search.send({s: confidence(s) for s in sets})
    except StopIteration as stop:
        return stop.value, len(asked)


def or_of_ands(groups: list[set[int]], high: float = 0.95, low: float = 0.05) -> Callable:
    """Confidence high when the set contains every patch of at least one group."""
    return lambda s: high if any(g <= set(s) for g in groups) else low


def test_search_finds_exactly_the_two_minimal_explanations():
    a, b, c = 10, 24, 40
    ranking = [a, b, c] + [p for p in range(49) if p not in (a, b, c)]
    result, _ = drive(beam_search(ranking, 0.95, SearchSettings(max_roots=1)), or_of_ands([{a, b}, {c}]))
    assert sorted(result.roots) == sorted([(a, b), (c,)])


def test_roots_are_pruned_to_one_minimal_sets():
    groups = [{3, 5, 9}, {20, 21}, {44}]
    confidence = or_of_ands(groups)
    ranking = list(range(49))[::-1]
    result, _ = drive(beam_search(ranking, 0.95, SearchSettings(max_roots=5, candidates=49)), confidence)
    assert result.roots
    for root in result.roots:
        assert confidence(root) > 0.9 * 0.95
        for patch in root:  # 1-minimal: no single removal stays sufficient
            assert confidence(tuple(p for p in root if p != patch)) <= 0.9 * 0.95
    assert {tuple(sorted(g)) for g in groups} >= set(result.roots)


@pytest.mark.parametrize("seed", range(5))
def test_batched_pruning_reproduces_sequential_pruning(seed):
    gen = torch.Generator().manual_seed(seed)
    table = {}

    def confidence(s):  # an arbitrary, non-monotone set function
        if s not in table:
            table[s] = float(torch.rand(1, generator=gen)) if len(s) > 2 else 0.0
        return table[s]

    start = [tuple(sorted(torch.randperm(49, generator=gen)[:9].tolist())) for _ in range(4)]
    bar = 0.3
    conf = {s: 1.0 for s in start}
    sequential, _ = drive(prune_sequential(start, conf, bar), confidence)
    batched, _ = drive(prune_batched(start, conf, bar), confidence)
    assert sequential[0] == batched[0]


def test_sufficiency_is_strict_and_relative():
    p0 = 0.8
    exactly = lambda s: 0.9 * p0 if 7 in s else 0.0  # noqa: E731  never strictly above 0.9 p0
    result, _ = drive(beam_search([7] + [p for p in range(49) if p != 7], p0, SearchSettings(max_depth=2)), exactly)
    assert result.roots == []


def test_counting_compositional_beats_disjunctive():
    mse = (1, 2, 3, 4, 5, 6)
    p0 = 1.0
    compositional = lambda s: len(s) / len(mse)  # noqa: E731  every patch adds a little
    disjunctive = lambda s: 1.0 if set(s) == set(mse) else 0.05  # noqa: E731  all or nothing
    counts = {}
    for name, f in (("compositional", compositional), ("disjunctive", disjunctive)):
        result, _ = drive(count_subexplanations([mse], p0, 0.5, 12, 10000), f)
        counts[name] = {t: sum(v >= t for v in result.relative.values()) for t in (0.9, 0.8, 0.7, 0.6, 0.5)}
    # compositional: subsets of size >= 3 reach 0.5; sizes 5 reach 0.8
    assert counts["compositional"][0.5] == sum(1 for k in range(3, 6) for _ in itertools.combinations(mse, k))
    assert counts["compositional"][0.8] == 6
    assert counts["disjunctive"][0.5] == 0
    assert all(counts["compositional"][t] >= counts["disjunctive"][t] for t in counts["compositional"])
    values = [counts["compositional"][t] for t in (0.9, 0.8, 0.7, 0.6, 0.5)]
    assert values == sorted(values)  # non-increasing as the threshold rises


def test_deletion_tree_for_large_mses_expands_only_confident_nodes():
    mse = tuple(range(14))
    f = lambda s: len(s) / 14  # noqa: E731
    result, asked = drive(count_subexplanations([mse], 1.0, 0.85, 12, 100000), f)
    # nodes of size 13 (0.93) and 12 (0.86) are expanded, 11 (0.79) are evaluated but not expanded
    assert max(len(s) for s in result.relative) == 13 and min(len(s) for s in result.relative) == 11
    assert asked == 14 + 91 + 364


# -- end to end on a constructed model --------------------------------------------------------------
class TentReader(torch.nn.Module):
    """Class 0's logit is 10 x max(tent a AND tent b, tent c), read at the tents' peak pixels."""

    def __init__(self, a: int, b: int, c: int):
        super().__init__()
        self.cells = (a, b, c)

    def present(self, x: torch.Tensor, cell: int) -> torch.Tensor:
        row, col = divmod(cell, GRID)
        return x[:, 0, row * 4, col * 4]

    def forward(self, x):
        a, b, c = (self.present(x, k) for k in self.cells)
        logit = 10 * torch.maximum(torch.minimum(a, b), c)
        return torch.cat([logit[:, None], torch.zeros(len(x), 9)], 1)


class FixedRanking(Attributor):
    """Ranks the given cells first (a test double for I-GOS)."""

    id: ClassVar[str] = "fixed_ranking"
    order: ClassVar[list[int]] = []

    def attribute(self, model, inputs, target, seeds):
        scores = torch.zeros(len(inputs), GRID * GRID)
        for rank, cell in enumerate(self.order):
            scores[:, cell] = 100 - rank
        g = Granularity("grid", GRID, SIZE, SIZE)
        return (scores @ torch.linalg.pinv(g.tents.T)).view(len(inputs), SIZE, SIZE)


def run_metric(model, tmp_path, **options):
    metric = Subexplanations(Subexplanations.Options(**options))
    masker = BlackFill(BlackFill.Options(granularity=f"grid:{GRID}"))
    FixedRanking.order = [10, 24, 40]
    ctx = MetricContext(models=[model], attributor=FixedRanking(), masker=masker, seed=0, batch_size=64,
                        out_dir=tmp_path, run_id="t")
    batch = Batch(samples=[Sample("img", "unused", None)], images=[None], seeds=[0])
    batch._inputs[id(model)] = torch.ones(1, 3, SIZE, SIZE)
    return metric.evaluate(batch, ctx)[0], ctx, metric


def test_metric_end_to_end_on_a_constructed_model(tmp_path):
    model = wrap_module(TentReader(10, 24, 40), size=SIZE, batch_size=64)
    record, ctx, metric = run_metric(model, tmp_path, max_roots=1)
    roots = sorted(tuple(m["patches"]) for m in record["values"]["mses"])
    assert roots == [(10, 24), (40,)]
    assert record["values"]["counts"]["0.5"] == 0  # each MSE's proper subsets lose the class
    assert record["values"]["ranking"][:3] == [10, 24, 40]
    assert record["values"]["forward_passes"]["search"] > 0
    summary = metric.summarize([{"sample_id": "img", **record}], ctx)
    assert summary.values["mean_n_mses"] == 2
    json.dumps(summary.model_dump())


def test_every_depth_is_one_forward_pass_and_nothing_is_evaluated_twice(tmp_path):
    model = wrap_module(TentReader(10, 24, 40), size=SIZE, batch_size=10_000)
    calls: list[int] = []
    model.module.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    record, _, _ = run_metric(model, tmp_path, max_roots=1, count=False)
    passes = record["values"]["forward_passes"]
    # the clean pass, then only cache misses: every evaluated patch set is counted once
    assert sum(calls) == 1 + passes["search"] + passes.get("pruning", 0)
    # one forward pass per search depth (all of a depth's candidates together) plus pruning rounds
    depth = record["values"]["depth"]
    assert depth <= len(calls) - 1 <= depth + passes.get("pruning", 0)


# -- cross-testing ------------------------------------------------------------------------------------
class Reads(torch.nn.Module):
    """Class 0's logit is 10 x (all of ``cells`` present), read at the tents' peaks."""

    def __init__(self, *cells: int):
        super().__init__()
        self.cells = cells

    def forward(self, x):
        present = torch.stack([x[:, 0, (k // GRID) * 4, (k % GRID) * 4] for k in self.cells], 1).amin(1)
        return torch.cat([10 * present[:, None], torch.zeros(len(x), 9)], 1)


def test_cross_testing_matrix_and_landscape(tmp_path):
    from harness_plugins.metrics.cross_testing import CrossTesting, classical_mds

    models = [
        wrap_module(Reads(40), size=SIZE, model_id="needs_c"),
        wrap_module(Reads(10, 24), size=SIZE, model_id="needs_ab"),
        wrap_module(Reads(10, 24, 40), size=SIZE, model_id="needs_abc"),
    ]
    metric = CrossTesting(CrossTesting.Options())
    FixedRanking.order = [10, 24, 40]
    ctx = MetricContext(models=models, attributor=FixedRanking(), masker=BlackFill(BlackFill.Options(granularity="grid:7")),
                        seed=0, batch_size=64, out_dir=tmp_path, run_id="x")
    batch = Batch(samples=[Sample("img", "unused", None)], images=[None], seeds=[0])
    for m in models:
        batch._inputs[id(m)] = torch.ones(1, 3, SIZE, SIZE)
    record = metric.evaluate(batch, ctx)[0]
    assert record["values"]["regions"] == [[40], [10, 24], [10, 24, 40]]
    rel = torch.tensor(record["values"]["relative"])
    assert torch.allclose(rel.diagonal(), torch.ones(3), atol=1e-6)
    # the c-model's region does not convince the ab-model and vice versa; the abc-model's region convinces all
    assert rel[0, 1] < 0.2 and rel[1, 0] < 0.2
    assert rel[2, 0] > 0.99 and rel[2, 1] > 0.99
    assert rel[0, 2] < 0.2 and rel[1, 2] < 0.2
    summary = metric.summarize([{"sample_id": "img", **record}], ctx)
    assert summary.values["models"] == ["needs_c", "needs_ab", "needs_abc"]
    # MDS reproduces a known configuration's distances
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    coords = classical_mds(torch.cdist(points, points))
    assert torch.allclose(torch.cdist(coords, coords), torch.cdist(points, points), atol=1e-9)
