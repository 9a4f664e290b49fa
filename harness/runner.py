"""One run: data -> models -> attributor -> masker -> metric -> samples file -> result file."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

from harness import __version__
from harness.components import Attributor, Dataset, Masker, Metric, Summary
from harness.data import Batch, Sample, UnreadableImage, sample_ids_sha256, sample_seed
from harness.errors import HarnessError
from harness.model import LoadedModel, load_model, resolve_device
from harness.options import build_component, parse_options
from harness.progress import progress, warn
from harness.registry import Registry, get_registry
from harness.results import SCHEMA_VERSION, Result, SamplesFile, write_result
from harness.visuals import VISUAL_SAMPLES


@dataclass
class RunConfig:
    """Everything ``harness run`` was asked to do (CLI-independent)."""

    models: list[str]
    metric: str
    attributor: str | None = None
    masker: str | None = None
    data: str = "samples"
    limit: int | None = None
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    weights: list[str] = field(default_factory=list)
    random_init: bool = False
    options: list[str] = field(default_factory=list)
    out: Path = Path("results")
    resume: bool = False
    quiet: bool = False
    on_bad_image: Literal["skip", "stop"] = "skip"
    argv: list[str] = field(default_factory=list)
    cache: bool = True
    cache_dir: Path | None = None


@dataclass
class MetricContext:
    """What a metric gets besides the batch: models, attributor, masker, and where artifacts go."""

    models: list[LoadedModel]
    attributor: Attributor | None
    masker: Masker | None
    seed: int
    batch_size: int
    out_dir: Path
    run_id: str
    quiet: bool = False
    visual_ids: frozenset[str] = frozenset()

    @property
    def model(self) -> LoadedModel:
        """The first (usually only) model."""
        return self.models[0]

    def artifact(self, name: str) -> tuple[Path, str]:
        """(absolute path to write, path relative to the result file) for an artifact ``name``."""
        from harness.plotting import artifact_path

        return artifact_path(self.out_dir, self.run_id, name)

    def keep_visual(self, sample_id: str, **tensors: torch.Tensor) -> None:
        """Store tensors (e.g. ``image=``, ``attribution=``) for plots if ``sample_id`` is among the first few."""
        if sample_id in self.visual_ids:
            from harness.visuals import save_visual

            save_visual(self.out_dir, self.run_id, sample_id, tensors)


@dataclass
class ResolvedRun:
    """Components resolved and validated, before any model is loaded."""

    config: RunConfig
    metric: Metric
    attributor: Attributor | None
    masker: Masker | None
    dataset: Dataset
    samples: list[Sample]
    run_id: str
    identity: dict[str, Any]


def weights_for(config: RunConfig) -> list[str | None]:
    """One weights file (or None: the default weights) per model of ``config``.

    ``--weights`` is either one PATH per ``--model`` in order, or ``ID=PATH`` entries naming the
    models they are for (models without one use their default weights; in suites, entries for models
    that are not in a run are ignored there).
    """
    entries = list(config.weights)
    if not entries:
        return [None] * len(config.models)
    keyed = [e.partition("=") for e in entries]
    if all(sep and key and not Path(e).exists() for e, (key, sep, _) in zip(entries, keyed)):
        mapping = {key: path for key, _, path in keyed}
        return [mapping.get(m) for m in config.models]
    if len(entries) != len(config.models):
        raise HarnessError(
            f"give one --weights per --model ({len(config.models)}), got {len(entries)}; "
            "or name the model: --weights ID=PATH"
        )
    return entries  # type: ignore[return-value]


def parse_data(spec: str) -> tuple[str, str | None]:
    """``samples`` / ``imagenet:PATH`` / ``folder:PATH`` -> (dataset id, path or None)."""
    name, sep, path = spec.partition(":")
    return name, (path if sep else None)


def _component_entry(component: Any) -> dict[str, Any] | None:
    if component is None:
        return None
    return {"id": component.id, "version": component.version, "options": component.options.model_dump(mode="json")}


def resolve(config: RunConfig, registry: Registry | None = None) -> ResolvedRun:
    """Check every id and option of ``config`` and fix the run id; loads no model."""
    reg = registry or get_registry()
    metric_cls = reg.get("metric", config.metric)
    n_models = len(config.models)
    if n_models < metric_cls.min_models or (metric_cls.max_models is not None and n_models > metric_cls.max_models):
        want = str(metric_cls.min_models) if metric_cls.max_models == metric_cls.min_models else (
            f"at least {metric_cls.min_models}" + (f" and at most {metric_cls.max_models}" if metric_cls.max_models else "")
        )
        raise HarnessError(f"metric {config.metric!r} takes {want} --model, got {n_models}")
    for model_id in config.models:
        reg.model_spec(model_id)  # unknown ids fail here, before anything runs
    if config.limit is not None and config.limit < 1:
        raise HarnessError(f"--limit must be at least 1, got {config.limit}")
    if config.batch_size < 1:
        raise HarnessError(f"--batch-size must be at least 1, got {config.batch_size}")
    per_model_weights = weights_for(config)

    classes: dict[str, Any] = {"metric": metric_cls}
    for kind, wanted, needed, default in (
        ("attributor", config.attributor, metric_cls.needs_attributor, metric_cls.default_attributor),
        ("masker", config.masker, metric_cls.needs_masker, metric_cls.default_masker),
    ):
        if wanted and not needed:
            raise HarnessError(f"metric {config.metric!r} takes no {kind} (got --{kind} {wanted})")
        if needed:
            chosen = wanted or default
            if chosen is None:
                raise HarnessError(f"metric {config.metric!r} needs --{kind}")
            classes[kind] = reg.get(kind, chosen)
    data_id, data_path = parse_data(config.data)
    classes["dataset"] = reg.get("dataset", data_id)

    fields = {kind: set(cls.Options.model_fields) for kind, cls in classes.items()}
    routed = parse_options(config.options, fields)
    if data_path is not None:
        routed["dataset"]["path"] = data_path
    built = {kind: build_component(cls, routed.get(kind, {}), kind) for kind, cls in classes.items()}

    dataset: Dataset = built["dataset"]  # type: ignore[assignment]
    samples = dataset.samples()
    if not samples:
        raise HarnessError(f"dataset {config.data!r} has no images")
    if config.limit is not None:
        samples = samples[: config.limit]

    weights = [str(Path(w).resolve()) if w else None for w in per_model_weights]
    identity = {
        "schema_version": SCHEMA_VERSION,
        "models": [
            {"id": m, "weights": w, "random_init": config.random_init} for m, w in zip(config.models, weights)
        ],
        "metric": _component_entry(built["metric"]),
        "attributor": _component_entry(built.get("attributor")),
        "masker": _component_entry(built.get("masker")),
        "dataset": {"id": config.data, "sample_ids_sha256": sample_ids_sha256(samples)},
        "seed": config.seed,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{config.metric}-{'+'.join(config.models)}")[:80]
    return ResolvedRun(
        config=config,
        metric=built["metric"],  # type: ignore[arg-type]
        attributor=built.get("attributor"),  # type: ignore[arg-type]
        masker=built.get("masker"),  # type: ignore[arg-type]
        dataset=dataset,
        samples=samples,
        run_id=f"{readable}-{digest}",
        identity=identity,
    )


def _load_images(run: ResolvedRun, samples: list[Sample]) -> tuple[list[Sample], list[Any]]:
    kept, images = [], []
    for sample in samples:
        try:
            images.append(run.dataset.load(sample))
        except UnreadableImage as exc:
            if run.config.on_bad_image == "stop":
                raise
            warn(f"skipping sample {sample.id}: {exc}")
            continue
        kept.append(sample)
    return kept, images


def _provenance(config: RunConfig, device: torch.device, reg: Registry, started: float, started_at: str) -> dict[str, Any]:
    import timm

    plugins = {p.dist or p.name: p.version for p in reg.plugins if p.enabled and not p.errors}
    return {
        "harness": __version__,
        "plugins": plugins,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
        "seed": config.seed,
        "batch_size": config.batch_size,
        "started_at": started_at,
        "duration_s": round(time.time() - started, 3),
        "argv": config.argv or sys.argv,
    }


def execute(run: ResolvedRun, registry: Registry | None = None) -> Path | None:
    """Evaluate ``run`` (resuming if asked), write its samples and result files, return the result path.

    Under torchrun every rank evaluates its share of the samples; rank 0 merges and returns the
    result path, the other ranks return None.
    """
    from harness import distributed
    from harness.allocator import tune_allocator

    tune_allocator()
    reg = registry or get_registry()
    config = run.config
    started, started_at = time.time(), datetime.now(timezone.utc).isoformat(timespec="microseconds")
    world = distributed.current()
    device = distributed.device_for(world, resolve_device(config.device))
    distributed.start(world, device)
    torch.manual_seed(config.seed)
    weights = weights_for(config)
    models = [
        load_model(
            reg.model_spec(model_id),
            weights=w,
            random_init=config.random_init,
            device=device,
            seed=config.seed,
            batch_size=config.batch_size,
        )
        for model_id, w in zip(config.models, weights)
    ]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    attributor, cache = run.attributor, None
    if attributor is not None and config.cache:
        from harness.cache import AttributionCache, CachedAttributor, default_cache_dir

        cache = AttributionCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir())
        attributor = CachedAttributor(attributor, cache)  # type: ignore[assignment]
    ctx = MetricContext(
        models=models,
        attributor=attributor,
        masker=run.masker,
        seed=config.seed,
        batch_size=config.batch_size,
        out_dir=out,
        run_id=run.run_id,
        quiet=config.quiet,
        visual_ids=frozenset(s.id for s in run.samples[:VISUAL_SAMPLES]),
    )
    samples_file = SamplesFile(out / f"{run.run_id}.samples.jsonl")
    own_file = rank_file(out, run.run_id, world) if world.distributed else samples_file
    if config.resume:
        done = {r["sample_id"] for r in samples_file.read(repair=world.is_main)}
        done |= {r["sample_id"] for r in own_file.read(repair=True)}
    else:
        if world.is_main:
            samples_file.reset()
        own_file.reset()
        done = set()
    distributed.barrier(world)
    mine = run.samples[world.rank :: world.size]
    todo = [s for s in mine if s.id not in done]
    bar = progress(len(mine), f"{run.metric.id} {'+'.join(config.models)}", config.quiet or not world.is_main)
    bar.update(len(mine) - len(todo))
    images_per_batch = max(1, run.metric.images_per_batch(config.batch_size))
    for start in range(0, len(todo), images_per_batch):
        kept, images = _load_images(run, todo[start : start + images_per_batch])
        if kept:
            batch = Batch(samples=kept, images=images, seeds=[sample_seed(config.seed, s.id) for s in kept])
            records = run.metric.evaluate(batch, ctx)
            if len(records) != len(kept):
                raise RuntimeError(f"metric {run.metric.id} returned {len(records)} records for {len(kept)} samples")
            own_file.append(
                [
                    {"sample_id": s.id, "label": s.label, "prediction": r.get("prediction"), "values": r.get("values", {})}
                    for s, r in zip(kept, records)
                ]
            )
        bar.update(min(images_per_batch, len(todo) - start))
    bar.close()
    distributed.barrier(world)
    if not world.is_main:
        distributed.stop(world)
        return None
    if world.distributed:
        merge_rank_files(samples_file, [rank_file(out, run.run_id, distributed.World(r, world.size)) for r in range(world.size)], run.samples)
    distributed.stop(world)

    order = {s.id: i for i, s in enumerate(run.samples)}
    unique = {r["sample_id"]: r for r in samples_file.read() if r["sample_id"] in order}
    records = sorted(unique.values(), key=lambda r: order[r["sample_id"]])
    if not records:
        raise HarnessError("no sample could be evaluated (every image was unreadable)")
    summary: Summary = run.metric.summarize(records, ctx)
    result = Result(
        schema_version=SCHEMA_VERSION,
        run_id=run.run_id,
        models=[m.provenance() for m in models],
        metric={
            "id": run.metric.id,
            "version": run.metric.version,
            "higher_is_better": run.metric.higher_is_better,
            "options": run.metric.options.model_dump(mode="json"),
        },
        attributor=_component_entry(run.attributor),
        masker=_component_entry(run.masker),
        dataset={"id": config.data, "n_samples": len(records), "sample_ids_sha256": sample_ids_sha256(run.samples)},
        value=summary.value,
        stderr=summary.stderr,
        values=summary.values,
        artifacts=summary.artifacts,
        provenance={
            **_provenance(config, device, reg, started, started_at),
            "attribution_cache": None if cache is None else {
                "path": str(cache.root), "hits": cache.stats.hits, "misses": cache.stats.misses,
            },
        },
        status="ok",
    )
    return write_result(result, out)


def run(config: RunConfig, registry: Registry | None = None) -> Path | None:
    """Resolve and execute ``config``; return the result file's path."""
    return execute(resolve(config, registry), registry)


def rank_file(out: Path, run_id: str, world: Any) -> SamplesFile:
    """The samples file one rank of a distributed run writes."""
    return SamplesFile(out / f"{run_id}.samples.rank{world.rank}-of-{world.size}.jsonl")


def merge_rank_files(target: SamplesFile, parts: list[SamplesFile], samples: list[Sample]) -> None:
    """Merge ``target``'s records and the ranks' into ``target`` (sample order, no duplicates), then
    delete the rank files. The merged file is written atomically before any rank file is removed."""
    from harness.results import atomic_write_text

    order = {s.id: i for i, s in enumerate(samples)}
    merged: dict[str, dict[str, Any]] = {}
    for part in [target, *parts]:
        for record in part.read():
            merged.setdefault(record["sample_id"], record)
    lines = [json.dumps(r, separators=(",", ":")) + "\n" for r in sorted(merged.values(), key=lambda r: order.get(r["sample_id"], len(order)))]
    atomic_write_text(target.path, "".join(lines))
    for part in parts:
        part.path.unlink(missing_ok=True)


def write_error_result(config: RunConfig, message: str, run: ResolvedRun | None = None) -> Path:
    """Record a failed run as a ``status: "error"`` result (suites go on after writing it)."""
    import timm

    if run is not None:
        run_id, identity = run.run_id, run.identity
    else:
        identity = {"models": config.models, "metric": config.metric, "attributor": config.attributor,
                    "masker": config.masker, "data": config.data, "options": config.options, "seed": config.seed}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        readable = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{config.metric}-{'+'.join(config.models)}")[:80]
        run_id = f"{readable}-{digest}"
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    reg = get_registry()
    metric_cls = reg.components["metric"].get(config.metric)
    result = Result(
        schema_version=SCHEMA_VERSION,
        run_id=run_id,
        models=[{"id": m, "source": "", "weights": "", "weights_sha256": None, "random_init": config.random_init} for m in config.models],
        metric={
            "id": config.metric,
            "version": metric_cls.obj.version if metric_cls else "",
            "higher_is_better": metric_cls.obj.higher_is_better if metric_cls else None,
            "options": run.metric.options.model_dump(mode="json") if run is not None else {},
        },
        attributor=_component_entry(run.attributor) if run is not None else None,
        masker=_component_entry(run.masker) if run is not None else None,
        dataset={"id": config.data, "n_samples": 0, "sample_ids_sha256": identity.get("dataset", {}).get("sample_ids_sha256", "") if run else ""},
        value=None,
        stderr=None,
        values={},
        artifacts={},
        provenance={
            "harness": __version__, "plugins": {}, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "device": config.device, "seed": config.seed, "batch_size": config.batch_size,
            "started_at": now, "duration_s": 0.0, "argv": config.argv or sys.argv,
        },
        status="error",
        error=message,
    )
    return write_result(result, Path(config.out))
