"""Linear probes (plugins/metrics/linear_probe.py, probe_solver.py): the closed-form solver against a
direct numpy ridge (big_vision's recipe written out), streamed statistics against one-shot sums,
separable features -> 100 %, random labels -> chance, the metric against a hand computation on the
same features, resume (with and without the cached fit), two shards merged, the CLI (ViT with a class
token, ResNet), and bad options as one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _labelled import make_labelled_folder
from _rep_helpers import cli_result
from conftest import wrap_module


# -- the solver against numpy ----------------------------------------------------------------------------------
def numpy_probe(x: np.ndarray, y: np.ndarray, classes: int, ridge: float):
    """big_vision fewshot_lsr, written out: standardise (population std + 1e-5), bias column 100,
    Y = 2 onehot - 1, W = (X^T X + lambda I)^-1 X^T Y (all D + 1 columns regularised)."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    xs = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    targets = 2.0 * np.eye(classes)[y] - 1.0
    w = np.linalg.solve(xs.T @ xs + ridge * np.eye(xs.shape[1]), xs.T @ targets)
    return w, lambda t: np.pad((t - mean) / std, ((0, 0), (0, 1)), constant_values=100.0) @ w


def _stats(x: np.ndarray, y: np.ndarray, classes: int, chunks=(1,), gemm=torch.float64):
    from harness_plugins.metrics.probe_solver import Stats, moments

    xt = torch.from_numpy(x)
    shift = xt[:2].mean(0).to(gemm).double()  # any fixed shift; the first rows' mean as the metric
    stats = Stats(1, x.shape[1], classes, shift)
    bounds = list(np.cumsum([0, *chunks[:-1]])) + [len(x)] if len(chunks) > 1 else [0, len(x)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        stats.add(moments(xt[a:b][None], torch.from_numpy(y[a:b]), classes, shift, gemm))
    return stats


@pytest.mark.parametrize("n,d,ridge", [(60, 7, 1024.0), (60, 7, 0.5), (6, 20, 1024.0), (6, 20, 3.0)])
def test_solver_is_the_numpy_ridge_on_standardised_features_with_bias(n, d, ridge):
    from harness_plugins.metrics.probe_solver import solve, solve_grid

    rng = np.random.default_rng(n * d)
    classes = 3
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, d) + rng.uniform(-50, 50, d)  # spread and offsets
    x[:, 2] = 4.0  # a constant feature: std 0 -> 1e-5, weight 0 (as big_vision)
    y = np.arange(n) % classes
    w_ref, predict_ref = numpy_probe(x, y, classes, ridge)
    probe = solve(_stats(x, y, classes), ridge)
    assert np.allclose(probe.w[0].numpy(), w_ref, rtol=1e-7, atol=1e-9)
    test = rng.normal(size=(40, d)) * 3 + x.mean(0)
    logits = probe.logits(torch.from_numpy(test)[None])[0].numpy()
    assert np.allclose(logits, predict_ref(test), rtol=1e-7, atol=1e-7)
    # the eigendecomposition route (ridge grid) is the same solution
    grid = solve_grid(_stats(x, y, classes), [ridge, 7.0])
    assert np.allclose(grid[0].w[0].numpy(), w_ref, rtol=1e-6, atol=1e-9)
    if n < d:  # big_vision's dual form for N < D: X^T (X X^T + lambda I)^-1 Y
        mean, std = x.mean(0), x.std(0) + 1e-5
        xs = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
        dual = xs.T @ np.linalg.solve(xs @ xs.T + ridge * np.eye(n), 2.0 * np.eye(classes)[y] - 1.0)
        assert np.allclose(probe.w[0].numpy(), dual, rtol=1e-6, atol=1e-9)


def test_streamed_statistics_equal_one_shot_sums():
    from harness_plugins.metrics.probe_solver import normal_equations, solve

    rng = np.random.default_rng(1)
    x = rng.normal(size=(97, 11)) + 1e3  # a large common offset
    y = rng.integers(0, 4, 97)
    one = _stats(x, y, 4)
    streamed = _stats(x, y, 4, chunks=(5, 1, 30, 17, 44))
    for name in ("n", "s", "xx", "xy", "counts"):
        assert torch.allclose(getattr(one, name), getattr(streamed, name), rtol=1e-12, atol=1e-9), name
    # the standardised system from the sums is the one of the standardised features themselves
    eq = normal_equations(streamed)
    xs = (x - x.mean(0)) / (x.std(0) + 1e-5)
    assert np.allclose(eq.gram[0].numpy(), xs.T @ xs, rtol=1e-9, atol=1e-8)
    assert np.allclose(eq.rhs[0].numpy(), xs.T @ (2.0 * np.eye(4)[y] - 1.0), rtol=1e-9, atol=1e-8)
    # float32 products after the shift: same predictions, weights to float32 precision
    single = _stats(x, y, 4, chunks=(5, 1, 30, 17, 44), gemm=torch.float32)
    w64, w32 = solve(streamed, 1024.0).w, solve(single, 1024.0).w
    assert torch.allclose(w32, w64, rtol=1e-4, atol=1e-6)


def test_separable_features_give_100_percent_and_random_labels_chance():
    from harness_plugins.metrics.probe_solver import correct, solve

    rng = np.random.default_rng(2)
    classes, d = 4, 16
    centres = rng.normal(size=(classes, d)) * 3

    def draw(n):
        y = rng.integers(0, classes, n)
        return centres[y] + 0.3 * rng.normal(size=(n, d)), y

    x, y = draw(40)
    t, ty = draw(500)
    probe = solve(_stats(x, y, classes), 1024.0)
    assert bool(correct(probe.logits(torch.from_numpy(t)[None]), torch.from_numpy(ty)).all())
    # Random features and labels: the labels of test points are independent of the probe, so the number
    # right is Binomial(M, 1/C): with M = 4000, C = 4 its sd is 0.0068; 0.035 is 5 sd.
    x, y = rng.normal(size=(40, d)), rng.integers(0, classes, 40)
    t, ty = rng.normal(size=(4000, d)), rng.integers(0, classes, 4000)
    acc = correct(solve(_stats(x, y, classes), 1024.0).logits(torch.from_numpy(t)[None]), torch.from_numpy(ty)).double().mean()
    assert abs(float(acc) - 0.25) < 0.035


# -- the metric on a tiny module -------------------------------------------------------------------------------
class Tiny(nn.Module):
    """A 1x1 conv (``feat``: a CNN-like feature map) and its flattened pool (``flat``: a vector)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Conv2d(3, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.flat(self.pool(self.feat(x))))


def colour_images(labels: list[int], size: int = 8, seed: int = 0, noise: float = 0.05, separable: bool = True,
                  signal: float = 0.6):
    """Class c: channel c brighter (0.2 + signal), others 0.2, plus pixel noise; or pure noise (``separable=False``)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in labels:
        base = np.full((size, size, 3), 0.2)
        if separable:
            base[..., c % 3] = 0.2 + signal
        else:
            base = rng.uniform(0, 1, (size, size, 3))
        pixels = np.clip(base + noise * rng.normal(size=base.shape), 0, 1)
        out.append(Image.fromarray((pixels * 255).round().astype(np.uint8), "RGB"))
    return out


def _ctx(model, samples, images, out_dir, batch_size=8, seed=0, run_id="test"):
    from harness.data import Batch
    from harness.runner import MetricContext

    by_id = {s.id: img for s, img in zip(samples, images)}

    def load(chosen):
        for start in range(0, len(chosen), batch_size):
            part = chosen[start : start + batch_size]
            yield Batch(samples=part, images=[by_id[s.id] for s in part], seeds=[0] * len(part))

    return MetricContext(models=[model], attributor=None, masker=None, seed=seed, batch_size=batch_size,
                         out_dir=Path(out_dir), run_id=run_id, samples=list(samples), load_batches=load)


def run_probe(options: dict, model, images, labels, out_dir, *, only=None, batch_size=8, seed=0):
    """(summary, records) of the metric evaluating ``only`` (default: every sample), as the runner does."""
    from harness.data import Sample
    from harness.results import _finite
    from harness_plugins.metrics.linear_probe import LinearProbe

    samples = [Sample(id=f"s{i:04d}", path="", label=l) for i, l in enumerate(labels)]
    ctx = _ctx(model, samples, images, out_dir, batch_size, seed)
    metric = LinearProbe(LinearProbe.Options(**options))
    todo = samples if only is None else [samples[i] for i in only]
    records = []
    for batch in ctx.load_batches(todo):
        for s, r in zip(batch.samples, metric.evaluate(batch, ctx)):
            records.append(json.loads(json.dumps(_finite({"sample_id": s.id, "label": s.label, **r}))))
    return ctx, records


def summarize(options, ctx, records):
    from harness_plugins.metrics.linear_probe import LinearProbe

    return LinearProbe(LinearProbe.Options(**options)).summarize(records, ctx)


@pytest.fixture(scope="module")
def tiny():
    return wrap_module(Tiny(), size=8)


def test_metric_separable_classes_reach_100_percent(tiny, tmp_path):
    labels = [i % 3 for i in range(30)]
    opts = {"layers": ["feat", "flat"], "shots": 3}
    ctx, records = run_probe(opts, tiny, colour_images(labels), labels, tmp_path)
    s = summarize(opts, ctx, records)
    assert s.values["layers"] == ["feat", "flat"] and s.values["features"] == ["gap", "token"]
    assert s.values["accuracy"] == {"gap": [1.0, 1.0], "token": [1.0, None]}  # a vector has no tokens
    assert s.values["skipped_features"] == ["cls"]
    assert s.values["n_train"] == [9, 9, 9] and s.values["n_test"] == [21, 21, 21]
    assert s.value == 1.0 and s.values["headline"] == "test accuracy of the gap probe at flat"
    assert (tmp_path / s.artifacts["linear_probe"]).exists()


def test_metric_random_labels_give_chance(tiny, tmp_path):
    """Random images with random labels (4 classes): every probe's accuracy is near 1/4. With 220 test
    images per repetition the sd of one repetition's accuracy is 0.029; 0.12 is 4 sd (seeded: deterministic)."""
    rng = np.random.default_rng(5)
    labels = rng.permutation([i % 4 for i in range(240)]).tolist()
    opts = {"layers": ["feat", "flat"], "shots": 5}
    ctx, records = run_probe(opts, tiny, colour_images(labels, separable=False, seed=3), labels, tmp_path, batch_size=48)
    s = summarize(opts, ctx, records)
    assert s.values["chance"] == 0.25
    for feature, accs in s.values["accuracy"].items():
        for acc in accs:
            assert acc is None or abs(acc - 0.25) < 0.12, (feature, accs)


def test_metric_equals_a_hand_computation_on_the_same_features(tiny, tmp_path):
    """Repetition 0 of the metric = numpy probes fitted on the same training images' features (own hooks)."""
    from harness.data import Sample
    from harness_plugins.metrics.linear_probe import LinearProbe, make_split

    rng = np.random.default_rng(7)
    labels = rng.permutation([i % 3 for i in range(36)]).tolist()
    images = colour_images(labels, noise=0.35, seed=9, signal=0.04)  # a weak signal: no probe is perfect
    opts = {"layers": ["feat", "flat"], "shots": 4, "ridge": 2.0, "gemm_dtype": "float64"}  # exact comparison
    ctx, records = run_probe(opts, tiny, images, labels, tmp_path)
    s = summarize(opts, ctx, records)

    module = tiny.module
    seen = {}
    handles = [module.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.detach().double()))
               for n in ("feat", "flat")]
    with torch.inference_mode():
        module(tiny.preprocess(images))
    for h in handles:
        h.remove()
    feat = seen["feat"].permute(0, 2, 3, 1).reshape(36, -1, 6).numpy()  # (n, P, D)
    flat = seen["flat"].numpy()
    samples = [Sample(id=f"s{i:04d}", path="", label=l) for i, l in enumerate(labels)]
    split = make_split(samples, LinearProbe.Options(**opts), 0)
    train = np.array([split.roles[s.id][0] != 0 for s in samples])
    y = np.array(labels)
    expected = {}
    for name, x in (("gap:feat", feat.mean(1)), ("gap:flat", flat)):
        _, predict = numpy_probe(x[train], y[train], 3, 2.0)
        expected[name] = float((predict(x[~train]).argmax(1) == y[~train]).mean())
    tokens_train = feat[train].reshape(-1, 6)
    positions = feat.shape[1]  # 8 x 8
    _, predict = numpy_probe(tokens_train, np.repeat(y[train], positions), 3, 2.0)  # shared probe: every token an example
    right = predict(feat[~train].reshape(-1, 6)).argmax(1) == np.repeat(y[~train], positions)
    expected["token:feat"] = float(right.mean())
    rep0 = s.values["per_repetition"][0]
    assert rep0["gap"][0] == pytest.approx(expected["gap:feat"], abs=1e-12)
    assert rep0["gap"][1] == pytest.approx(expected["gap:flat"], abs=1e-12)
    assert rep0["token"][0] == pytest.approx(expected["token:feat"], abs=1e-12)
    assert len(set(expected.values())) == 3 and all(0.0 < v < 1.0 for v in expected.values())  # not trivial
    # mean and stderr across the repetitions
    reps = [r["gap"][1] for r in s.values["per_repetition"]]
    assert s.value == pytest.approx(np.mean(reps), abs=1e-12)
    assert s.stderr == pytest.approx(np.std(reps, ddof=1) / np.sqrt(3), abs=1e-12)


def test_ridge_grid_and_per_position_probes(tiny, tmp_path):
    from harness_plugins.metrics.linear_probe import load_fit

    labels = [i % 3 for i in range(30)]
    images = colour_images(labels, noise=0.3, seed=4)
    opts = {"layers": ["feat"], "shots": 5, "ridge_grid": [0.01, 1.0, 1e6], "token_probe": "per_position"}
    ctx, records = run_probe(opts, tiny, images, labels, tmp_path)
    s = summarize(opts, ctx, records)
    for ridge in s.values["ridge"]["gap"] + s.values["ridge"]["token"]:
        assert 0.01 <= ridge <= 1e6
    assert s.values["token_probe"] == "per_position"
    [header] = [r["values"]["probe"] for r in records[:1]]
    assert all(v in (0.01, 1.0, 1e6) for row in header["ridge"] for v in row)
    fit = load_fit(tmp_path / "test" / "linear_probe_fit.pt", header["key"])
    assert fit is not None and fit.models[0][1].w.shape == (64, 7, 3)  # 8x8 positions, 6 features + bias, 3 classes
    assert load_fit(tmp_path / "test" / "linear_probe_fit.pt", "another key") is None


def test_unlabelled_samples_are_skipped_and_counted(tiny, tmp_path):
    labels = [i % 3 for i in range(24)] + [None] * 3
    opts = {"layers": ["flat"], "shots": 3}
    ctx, records = run_probe(opts, tiny, colour_images([l or 0 for l in labels]), labels, tmp_path)
    s = summarize(opts, ctx, records)
    assert s.values["unlabelled"] == 3 and s.values["n_test"] == [15, 15, 15]
    assert [r["values"].get("skipped") for r in records[-3:]] == ["no label"] * 3


def test_two_shards_merged_equal_one_run(tiny, tmp_path):
    """As under torchrun: each process fits the same probes from the full sample list (no shared state)
    and evaluates its share; the merged records summarise to the single run's numbers exactly."""
    rng = np.random.default_rng(3)
    labels = rng.permutation([i % 3 for i in range(33)]).tolist()
    images = colour_images(labels, noise=0.35, seed=2)
    opts = {"layers": ["feat", "flat"], "shots": 4}
    ctx, whole = run_probe(opts, tiny, images, labels, tmp_path / "one")
    _, even = run_probe(opts, tiny, images, labels, tmp_path / "rank0", only=range(0, 33, 2))
    _, odd = run_probe(opts, tiny, images, labels, tmp_path / "rank1", only=range(1, 33, 2))
    merged = sorted(even + odd, key=lambda r: r["sample_id"])
    a, b = summarize(opts, ctx, whole), summarize(opts, ctx, merged)
    assert a.value == b.value and a.stderr == b.stderr and a.values["accuracy"] == b.values["accuracy"]
    assert summarize(opts, ctx, odd + even).values["per_repetition"] == a.values["per_repetition"]  # any order
    from harness.errors import HarnessError

    other = [dict(r, values=dict(r["values"], probe=dict(r["values"]["probe"], key="x"))) if "probe" in r["values"] else r
             for r in odd]
    with pytest.raises(HarnessError, match="mixes"):
        summarize(opts, ctx, even + other)


def test_too_few_images_or_classes_are_one_line(tiny, tmp_path):
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="at least 2 classes"):
        run_probe({"layers": ["flat"], "shots": 1}, tiny, colour_images([0] * 6), [0] * 6, tmp_path)
    with pytest.raises(HarnessError, match=r"class 1 has 3 labelled image\(s\); 3-shot probes need at least 4"):
        run_probe({"layers": ["flat"], "shots": 3}, tiny, colour_images([0] * 6 + [1] * 3), [0] * 6 + [1] * 3, tmp_path)
    with pytest.raises(HarnessError, match="ridge needs at least 2 training images"):
        run_probe({"layers": ["flat"], "shots": 1, "ridge_grid": [1.0]}, tiny, colour_images([0, 1] * 3), [0, 1] * 3, tmp_path)
    with pytest.raises(HarnessError, match="statistics would take over"):  # per-position probes: P x D^2 each
        run_probe({"layers": ["feat"], "shots": 1, "token_probe": "per_position", "max_memory_gb": 1e-5}, tiny,
                  colour_images([0, 1] * 3), [0, 1] * 3, tmp_path)
    with pytest.raises(HarnessError, match="none of the features cls exists"):  # no class token
        run_probe({"layers": ["feat"], "shots": 1, "features": "cls"}, tiny, colour_images([0, 1] * 3), [0, 1] * 3, tmp_path)


# -- CLI --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return make_labelled_folder(tmp_path_factory.mktemp("probe_data"), classes=3, per_class=8, size=64)


VIT = ["run", "--model", "test_vit", "--random-init", "--metric", "linear_probe", "--batch-size", "8",
       "-o", "metric.shots=3", "--quiet"]


def test_cli_vit_with_class_token(cli, labelled, tmp_path):
    path, result = cli_result(cli(*VIT, "--data", f"imagefolder:{labelled}", "--out", tmp_path))
    values = result["values"]
    assert values["layers"] == [f"blocks.{i}" for i in range(6)]
    assert values["features"] == ["cls", "gap", "token"] and values["skipped_features"] == []
    assert values["n_train"] == [9, 9, 9] and values["n_test"] == [15, 15, 15] and values["classes"] == 3
    assert result["value"] == values["accuracy"]["cls"][-1] and result["stderr"] == values["accuracy_stderr"]["cls"][-1]
    assert all(0.0 <= a <= 1.0 for accs in values["accuracy"].values() for a in accs)
    assert values["ridge"]["gap"] == [1024.0] * 6
    folder = tmp_path / result["run_id"]
    assert (folder / "linear_probe_fit.pt").exists()
    png = tmp_path / result["artifacts"]["linear_probe"]
    assert png.exists() and png.stat().st_size > 1000
    png.unlink()
    assert cli("plot", path).exit_code == 0 and png.exists()
    # verify replays a few samples; the probes are fitted on the run's whole sample list, not on those few
    check = cli("verify", path, "--samples", "3")
    assert check.exit_code == 0 and "passed" in check.stdout, check.stdout + check.stderr


def test_cli_resnet_has_no_class_token(cli, labelled, tmp_path):
    _, result = cli_result(cli("run", "--model", "test_resnet", "--random-init", "--metric", "linear_probe", "--batch-size", "8",
                            "-o", "metric.train_fraction=0.5", "-o", "metric.repetitions=2", "--quiet",
                            "--data", f"imagefolder:{labelled}", "--out", tmp_path))
    values = result["values"]
    assert values["features"] == ["gap", "token"] and values["skipped_features"] == ["cls"]
    assert values["layers"] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert values["n_train"] == [12, 12] and values["shots"] is None and values["train_fraction"] == 0.5
    assert result["value"] == values["accuracy"]["gap"][-1]


def test_cli_resume_gives_the_uninterrupted_numbers(cli, labelled, tmp_path, monkeypatch):
    args = [*VIT, "--data", f"imagefolder:{labelled}", "-o", "metric.layers=blocks.5,blocks.2"]
    _, full = cli_result(cli(*args, "--out", tmp_path / "full"))
    lines = (tmp_path / "full" / f"{full['run_id']}.samples.jsonl").read_text().splitlines(keepends=True)
    for name, with_fit in (("refit", False), ("cached", True)):
        target = tmp_path / name
        target.mkdir()
        (target / f"{full['run_id']}.samples.jsonl").write_text("".join(lines[:10]))  # interrupted after 10 samples
        if with_fit:  # the cached probes are used: fitting again would fail
            shutil.copytree(tmp_path / "full" / full["run_id"], target / full["run_id"])
            from harness_plugins.metrics import linear_probe

            monkeypatch.setattr(linear_probe.LinearProbe, "_fit_probes", lambda *a: pytest.fail("refitted"))
        _, resumed = cli_result(cli(*args, "--out", target, "--resume"))
        assert resumed["values"]["accuracy"] == full["values"]["accuracy"], name
        assert resumed["value"] == full["value"] and resumed["stderr"] == full["stderr"]
        assert resumed["values"]["per_repetition"] == full["values"]["per_repetition"]


def test_cli_bad_options_and_data_are_one_line(cli, labelled, tmp_path, image_folder_unlabelled):
    cases = [
        (["-o", "metric.shots=2", "-o", "metric.train_fraction=0.5"], "shots or train_fraction"),
        (["-o", "metric.ridge_grid=[1,-2]"], "ridge_grid"),
        (["-o", "metric.features=cls,pixels"], "features"),
        (["-o", "metric.shots=8"], "8-shot probes need at least 9 per class"),
        (["-o", "metric.layers=nothing.*"], "matches no module"),
    ]
    for extra, message in cases:
        res = cli(*VIT, "--data", f"imagefolder:{labelled}", "--out", tmp_path, *extra)
        assert res.exit_code != 0 and message in res.stderr, (extra, res.stderr)
        assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr, res.stderr
    res = cli(*VIT, "--data", f"folder:{image_folder_unlabelled}", "--out", tmp_path)
    assert res.exit_code != 0 and "labelled images of at least 2 classes" in res.stderr
    assert res.stderr.strip().count("\n") == 0


@pytest.fixture
def image_folder_unlabelled(tmp_path):
    from _rep_helpers import image_folder

    return image_folder(tmp_path / "plain", 6, size=32)


def test_batch_size_does_not_change_the_probes(tiny, tmp_path):
    """Statistics streamed in batches of 3 or all at once give the same probes (float64 products)."""
    from harness_plugins.metrics.linear_probe import load_fit

    rng = np.random.default_rng(11)
    labels = rng.permutation([i % 3 for i in range(30)]).tolist()
    images = colour_images(labels, noise=0.35, seed=5, signal=0.1)
    opts = {"layers": ["feat", "flat"], "shots": 4, "gemm_dtype": "float64"}
    _, small = run_probe(opts, tiny, images, labels, tmp_path / "small", batch_size=3)
    _, large = run_probe(opts, tiny, images, labels, tmp_path / "large", batch_size=30)
    key = small[0]["values"]["probe"]["key"]
    a = load_fit(tmp_path / "small" / "test" / "linear_probe_fit.pt", key)
    b = load_fit(tmp_path / "large" / "test" / "linear_probe_fit.pt", key)
    assert a is not None and b is not None
    for row_a, row_b in zip(a.models, b.models):
        for pa, pb in zip(row_a, row_b):
            assert torch.allclose(pa.w, pb.w, rtol=1e-9, atol=1e-12)
    assert [r["values"].get("correct") for r in small] == [r["values"].get("correct") for r in large]


def test_solver_predicts_what_big_vision_predicts():
    """Fixture from big_vision's published probe (evaluators/fewshot_lsr.py, run unmodified in jax float64
    by a driver outside the repository): per test sample, whether its prediction is right, for N >= D and
    N < D (its dual form) and several ridges."""
    from harness_plugins.metrics.probe_solver import solve, solve_grid

    fixture = json.loads((Path(__file__).parent / "fixtures" / "big_vision" / "fewshot_lsr.json").read_text())
    assert len(fixture["cases"]) == 5
    for case in fixture["cases"]:
        x, y = np.array(case["x_train"]), np.array(case["y_train"])
        x_test, y_test = torch.tensor(case["x_test"]), np.array(case["y_test"])
        stats = _stats(x, y, case["classes"])
        for probe in (solve(stats, case["l2"]), solve_grid(stats, [case["l2"]])[0]):
            predicted = probe.logits(x_test[None])[0].argmax(1).numpy()
            assert (predicted == y_test).astype(float).tolist() == case["correct"]
            assert (predicted == y_test).mean() == pytest.approx(case["accuracy"])
