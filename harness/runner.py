"""One run: data -> models -> attributor -> masker -> metric -> samples file -> result file."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from harness import __version__
from harness.components import Attributor, Component, Dataset, Masker, Metric, Options, Summary
from harness.data import Batch, Sample, UnreadableImage, printable, sample_ids_sha256, sample_seed, valid_names
from harness.errors import HarnessError
from harness.execution import AUTO, ExecutionMode, metric_batch_size, parse_batch_size
from harness.identity import FileDigest, SampleDigests, combined_sha256, digest_cache, digest_samples, identity_sha256
from harness.model import LoadedModel, ModelOptions, load_model, resolve_device
from harness.options import build_component, build_options, parse_options
from harness.progress import progress, warn
from harness.records import Stamp, explain_fresh_start, in_sample_order, make_line, read_lines
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
    batch_size: int | str = AUTO  # "auto": calibrated forward-pass size (harness.execution)
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
    in_suite: bool = False  # --weights ID=PATH may then name models of other entries
    execution: ExecutionMode = field(default_factory=ExecutionMode)  # --precision, --memory-format, --compile
    python_objects: tuple[str, ...] = ()  # parts given as Python objects (harness.evaluate): not replayable by verify


SEED_MAX = 2**63 - 1
"""--seed is 0 ... 2**63 - 1: what torch, numpy and Python's random all take."""


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
    samples: list[Sample] = field(default_factory=list)
    """Every sample of the run, in run order (all ranks alike; for metrics that fit something first)."""
    load_batches: Callable[[list[Sample]], Iterator[Batch]] | None = None
    """Batches of chosen samples, loaded as the run loads its own (unreadable ones skipped), --batch-size at a time."""

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
    stamp: Stamp  # what each samples-file line carries to prove it belongs to this run
    digests: SampleDigests
    weights_files: list[FileDigest | None]
    model_options: ModelOptions = field(default_factory=ModelOptions)
    all_samples: list[Sample] | None = None
    """Every sample of the run when ``samples`` is a subset of it (``harness verify`` replays some):
    what metrics that fit on the run's samples first (``linear_probe``) get as ``ctx.samples``."""


def weights_for(config: RunConfig) -> list[str | None]:
    """One weights file (or None: the default weights) per model of ``config``.

    ``--weights`` is either one PATH per ``--model`` in order, or ``ID=PATH`` entries naming the
    models they are for (models without one use their default weights). An ID that is no model of
    the run is an error, except in suites, where it must name a model of some entry.
    """
    entries = list(config.weights)
    if not entries:
        return [None] * len(config.models)
    mapping = weight_ids(entries)
    if mapping is not None:
        if not config.in_suite:
            check_weight_ids(mapping, config.models)
        return [mapping.get(m) for m in config.models]
    if len(entries) != len(config.models):
        raise HarnessError(
            f"give one --weights per --model ({len(config.models)}), got {len(entries)}; "
            "or name the model: --weights ID=PATH"
        )
    return entries  # type: ignore[return-value]


def weight_ids(entries: list[str]) -> dict[str, str] | None:
    """``ID=PATH`` entries as {id: path}; None when they are plain paths."""
    keyed = [e.partition("=") for e in entries]
    if not all(sep and key and not Path(e).exists() for e, (key, sep, _) in zip(entries, keyed)):
        return None
    mapping: dict[str, str] = {}
    for key, _, path in keyed:
        if key in mapping and mapping[key] != path:
            raise HarnessError(f"--weights names {key!r} twice ({mapping[key]} and {path})")
        mapping[key] = path
    return mapping


def check_weight_ids(mapping: dict[str, str], models: list[str], where: str = "this run") -> None:
    """Every ``--weights ID=PATH`` must name one of ``models``."""
    for key in mapping:
        if key not in models:
            raise HarnessError(
                f"--weights {key}=...: {key!r} is not a model of {where} (models: {', '.join(dict.fromkeys(models))})"
            )


def parse_data(spec: str) -> tuple[str, str | None]:
    """``samples`` / ``imagenet:PATH`` / ``folder:PATH`` / ``imagefolder:PATH`` -> (dataset id, path or None)."""
    name, sep, path = spec.partition(":")
    if sep and not path.strip():
        raise HarnessError(f"--data {spec!r}: the path after ':' is empty; e.g. --data {name}:PATH")
    return name, (path if sep else None)


def _component_entry(component: Any) -> dict[str, Any] | None:
    """id, version, options, and what a component reports of its content (``content_identity()``,
    e.g. the digest of maps computed elsewhere)."""
    if component is None:
        return None
    content = getattr(component, "content_identity", None)
    return {"id": component.id, "version": component.version, "options": component.options.model_dump(mode="json"),
            **(content() if callable(content) else {})}


def _content_identity(component: Any) -> dict[str, Any]:
    """What a component reports of its content (``content_identity()``), or nothing."""
    content = getattr(component, "content_identity", None)
    return content() if callable(content) else {}


def _identity_entry(component: Any) -> dict[str, Any] | None:
    """A component's entry in the run identity: as recorded, without its ``path`` option (a location;
    what is there is identified by its content digest, as for datasets)."""
    entry = _component_entry(component)
    if entry is not None and "path" in entry["options"]:
        entry["options"] = {k: v for k, v in entry["options"].items() if k != "path"}
    return entry


def split_path(spec: str, flag: str) -> tuple[str, str | None]:
    """``ID:PATH`` -> (ID, PATH); ``ID`` -> (ID, None). PATH becomes the component's ``path`` option."""
    name, sep, path = spec.partition(":")
    if sep and not path.strip():
        raise HarnessError(f"{flag} {spec!r}: the path after ':' is empty; e.g. {flag} {name}:PATH")
    return name, (path if sep else None)


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
    specs = [reg.model_spec(model_id) for model_id in config.models]  # unknown ids fail here, before anything runs
    if config.limit is not None and config.limit < 1:
        raise HarnessError(f"--limit must be at least 1, got {config.limit}")
    parse_batch_size(config.batch_size)
    config.execution.check()
    if not 0 <= config.seed <= SEED_MAX:
        raise HarnessError(f"--seed must be between 0 and 2**63-1 ({SEED_MAX}), got {config.seed}")
    if config.weights and config.random_init:
        raise HarnessError("--weights and --random-init exclude each other")
    per_model_weights = weights_for(config)

    classes: dict[str, Any] = {"metric": metric_cls}
    paths: dict[str, str | None] = {}
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
            chosen, paths[kind] = split_path(chosen, f"--{kind}") if kind == "attributor" else (chosen, None)
            classes[kind] = reg.get(kind, chosen)
    data_id, data_path = parse_data(config.data)
    classes["dataset"] = reg.get("dataset", data_id)

    fields = {kind: set(cls.Options.model_fields) for kind, cls in classes.items()}
    fields["model"] = set(ModelOptions.model_fields)
    routed = parse_options(config.options, fields)
    if data_path is not None:
        routed["dataset"]["path"] = data_path
    if paths.get("attributor") is not None:
        routed["attributor"]["path"] = paths["attributor"]
    built: dict[str, Component | Options] = {
        kind: build_component(cls, routed.get(kind, {}), kind) for kind, cls in classes.items()
    }
    built["model"] = build_options(ModelOptions, routed.get("model", {}), "model")

    dataset: Dataset = built["dataset"]  # type: ignore[assignment]
    samples = dataset.samples()
    if not samples:
        raise HarnessError(f"dataset {config.data!r} has no images")
    if config.limit is not None:
        samples = samples[: config.limit]
    samples = valid_names(samples, stop=config.on_bad_image == "stop")

    cache = digest_cache(config.cache_dir)
    weights_files = [_weights_digest(w, cache) if w else None for w in per_model_weights]
    own_digests = getattr(dataset, "content_digests", None)  # data that are no files (harness.evaluate)
    digests = SampleDigests(own_digests(samples), {}) if callable(own_digests) else digest_samples(samples, cache)
    bind = getattr(built.get("attributor"), "bind_samples", None)  # attributors that serve maps by sample id
    if callable(bind):
        bind(samples, config.seed)
    by_samples = getattr(built["metric"], "samples_identity", None)  # e.g. the files localisation boxes come from
    if callable(by_samples):
        by_samples(samples, cache)
        cache.save()
    identity = _identity(config, data_id, built, samples, weights_files, digests, specs)
    full = identity_sha256(identity)
    readable = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{config.metric}-{'+'.join(config.models)}")[:80]
    return ResolvedRun(
        config=config,
        metric=built["metric"],  # type: ignore[arg-type]
        attributor=built.get("attributor"),  # type: ignore[arg-type]
        masker=built.get("masker"),  # type: ignore[arg-type]
        dataset=dataset,
        samples=samples,
        run_id=f"{readable}-{full[:12]}",
        identity=identity,
        stamp=Stamp(run_sha256=full, weights_sha256=[f.sha256 if f else None for f in weights_files], samples=digests.sha256),
        digests=digests,
        weights_files=weights_files,
        model_options=built["model"],  # type: ignore[arg-type]
    )


def _identity(
    config: RunConfig, data_id: str, built: dict[str, Any], samples: list[Sample],
    weights_files: list[FileDigest | None], digests: SampleDigests, specs: list[Any] | None = None,
) -> dict[str, Any]:
    """What determines a run's numbers (the run id hashes it): models with their weights' content
    digest, components with versions and options, the dataset kind and options (not its path), the
    ordered sample ids and their content digests, and the seed."""
    dataset_options = {k: v for k, v in built["dataset"].options.model_dump(mode="json").items() if k != "path"}
    return {
        "schema_version": SCHEMA_VERSION,
        "models": [
            # a user's module (harness.evaluate) is identified by its parameters' digest
            {"id": m, "weights_sha256": f.sha256 if f else getattr(spec, "parameters_sha256", None), "random_init": config.random_init}
            for m, f, spec in zip(config.models, weights_files, specs or [None] * len(config.models))
        ],
        "model_options": built["model"].model_dump(mode="json"),
        "metric": _component_entry(built["metric"]),
        "attributor": _identity_entry(built.get("attributor")),
        "masker": _component_entry(built.get("masker")),
        "dataset": {
            "id": data_id,
            "options": dataset_options,
            "sample_ids_sha256": sample_ids_sha256(samples),
            "samples_sha256": combined_sha256(digests.sha256[s.id] for s in samples),
            **_content_identity(built["dataset"]),  # e.g. imagefolder's class mapping (labels are no file content)
        },
        "seed": config.seed,
        # reduced precision changes numbers; fp32 run ids stay as they were (memory format, compile and
        # batch size change float rounding only, so they are not part of the identity)
        **({"execution": config.execution.identity()} if config.execution.reduced else {}),
    }


def _weights_digest(path: str, cache: Any) -> FileDigest:
    """The sha256 of a ``--weights`` file (its content, not its name, is part of the run id)."""
    if not Path(path).is_file():
        raise HarnessError(f"weights file not found: {path}")
    try:
        return cache.digest(path)
    except OSError as exc:
        raise HarnessError(f"cannot read weights file {path}: {exc.strerror or exc}") from None


def _load_images(run: ResolvedRun, samples: list[Sample]) -> tuple[list[Sample], list[Any]]:
    """The images of ``samples``; an unreadable one (or one whose file changed since it was hashed)
    is skipped with one warning, or stops the run with ``--on-bad-image stop``."""
    kept, images = [], []
    for sample in samples:
        try:
            image = run.dataset.load(sample)
            if not run.digests.unchanged(sample.id):
                raise UnreadableImage(f"{printable(sample.path)} changed after the run started (its content is part of the run id)")
        except UnreadableImage as exc:
            if run.config.on_bad_image == "stop":
                raise
            warn(f"skipping sample {printable(sample.id)}: {exc}")
            continue
        images.append(image)
        kept.append(sample)
    return kept, images


def iter_batches(run: ResolvedRun, samples: list[Sample], size: int) -> Iterator[Batch]:
    """Batches of ``size`` of ``samples``, loaded and seeded as the run's own (unreadable ones skipped)."""
    for start in range(0, len(samples), max(1, size)):
        kept, images = _load_images(run, samples[start : start + size])
        if kept:
            yield Batch(samples=kept, images=images, seeds=[sample_seed(run.config.seed, s.id) for s in kept])


def replay_config(run: ResolvedRun) -> dict[str, Any] | None:
    """What ``harness verify`` needs to run this configuration again (``provenance.run_config``);
    None when parts were Python objects (``harness.evaluate``), which cannot be rebuilt."""
    c = run.config
    if c.python_objects:
        return None
    name, path = parse_data(c.data)
    attributor = c.attributor
    if attributor is not None and split_path(attributor, "--attributor")[1] is not None:
        kind, place = split_path(attributor, "--attributor")
        attributor = f"{kind}:{Path(str(place)).expanduser().resolve()}"
    return {
        "models": list(c.models), "metric": c.metric, "attributor": attributor, "masker": c.masker,
        "data": c.data if path is None else f"{name}:{Path(path).expanduser().resolve()}",
        "options": list(c.options), "limit": c.limit, "seed": c.seed, "batch_size": _recorded_batch_size(c),
        "batch_size_auto": c.batch_size == AUTO, "execution": c.execution.record(),
        "weights": [f.path if f else None for f in run.weights_files], "random_init": c.random_init,
        "on_bad_image": c.on_bad_image,
    }


def _recorded_batch_size(config: RunConfig) -> int:
    """``--batch-size`` as an integer for result files: the images per metric step (32 for auto)."""
    try:
        return metric_batch_size(parse_batch_size(config.batch_size))
    except HarnessError:
        return 0


def execution_provenance(session: "Session") -> dict[str, Any]:
    """The execution mode and forward-pass size a run used (``provenance`` keys)."""
    formats = [m.execution.memory_format for m in session.models]
    return {
        "batch_size": session.batch_size,
        "batch_size_auto": session.batch_size_auto,
        "precision": session.run.config.execution.precision,
        "reduced_precision_gradients": session.run.config.execution.reduced_precision_gradients,
        "memory_format": formats[0] if len(set(formats)) == 1 else formats,
        "compile": session.run.config.execution.compile,
        "folded_batchnorm": [m.execution.folded_batchnorm for m in session.models],
    }


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
        "batch_size": _recorded_batch_size(config),
        "started_at": started_at,
        "duration_s": round(time.time() - started, 3),
        "argv": config.argv or sys.argv,
    }


@dataclass
class Session:
    """A run being evaluated: its models and context, and the samples files it writes."""

    run: ResolvedRun
    world: Any
    device: torch.device
    models: list[LoadedModel]
    ctx: MetricContext
    cache: Any  # AttributionCache | None
    samples_file: SamplesFile
    own_file: SamplesFile  # this rank's file (the samples file itself outside torchrun)
    batch_size: int = 32  # rows per forward pass (calibrated under --batch-size auto)
    batch_size_auto: bool = False


def check_outputs(config: RunConfig, needs_cache: bool) -> None:
    """The output folder (and the attribution cache folder, when used) must be writable: checked
    before any model loads, so a wrong ``--out`` costs nothing."""
    from harness.cache import default_cache_dir
    from harness.outputs import check_writable

    check_writable(Path(config.out), "output folder (--out)")
    if needs_cache:
        check_writable(Path(config.cache_dir) if config.cache_dir else default_cache_dir(), "attribution cache folder (--cache)")


def open_session(run: ResolvedRun, reg: Registry, world: Any, device: torch.device) -> Session:
    """Load the models, wrap the attributor in the cache, and name the samples files."""
    config = run.config
    torch.manual_seed(config.seed)
    step = metric_batch_size(config.batch_size)
    models = [
        load_model(
            reg.model_spec(model_id),
            weights=w.path if w else None,
            random_init=config.random_init,
            device=device,
            seed=config.seed,
            batch_size=step,
            resize=run.model_options.resize,
            execution=config.execution,
        )
        for model_id, w in zip(config.models, run.weights_files)
    ]
    forward_size = _forward_batch_size(config, models, world)
    for model in models:
        model.batch_size = forward_size
    for w in run.weights_files:
        if w is not None and not w.unchanged():
            raise HarnessError(f"weights file {w.path} changed while the run started (its content is part of the run id); run again")
    out = Path(config.out)
    attributor, cache = run.attributor, None
    use_cache = config.cache and getattr(attributor, "cacheable", True)  # stored maps are not cached again
    if attributor is not None and config.execution.reduced:
        attributor, use_cache = _reduced_precision_attributor(attributor, config, world, use_cache)
    note = getattr(run.metric, "reduced_precision_warning", None)
    if config.execution.reduced and note and world.is_main:
        warn(f"--precision {config.execution.precision} with {run.metric.id}: {note}")
    if attributor is not None and use_cache:
        from harness.cache import AttributionCache, CachedAttributor, default_cache_dir

        cache = AttributionCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir())
        attributor = CachedAttributor(attributor, cache)  # type: ignore[assignment]
    ctx = MetricContext(
        models=models,
        attributor=attributor,
        masker=run.masker,
        seed=config.seed,
        batch_size=step,
        out_dir=out,
        run_id=run.run_id,
        quiet=config.quiet,
        visual_ids=frozenset(s.id for s in run.samples[:VISUAL_SAMPLES]),
        samples=list(run.all_samples if run.all_samples is not None else run.samples),
        load_batches=lambda chosen: iter_batches(run, chosen, step),
    )
    samples_file = SamplesFile(out / f"{run.run_id}.samples.jsonl")
    own_file = rank_file(out, run.run_id, world) if world.distributed else samples_file
    return Session(run, world, device, models, ctx, cache, samples_file, own_file, forward_size, config.batch_size == AUTO)


def _forward_batch_size(config: RunConfig, models: list[LoadedModel], world: Any) -> int:
    """``--batch-size`` N, or under ``auto`` the smallest of the models' calibrated sizes (rank 0's
    choice under torchrun, so every rank batches alike). Warns when reduced precision is emulated."""
    from harness.execution import auto_batch_size, native_reduced_precision

    if models and not native_reduced_precision(config.execution.precision, models[0].device) and world.is_main:
        warn(f"--precision {config.execution.precision}: this CPU has no native {config.execution.precision} support "
             "(no AVX-512 BF16/FP16); it is emulated and much slower than fp32")
    if config.batch_size != AUTO:
        return int(config.batch_size)
    from harness.cache import default_cache_dir

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    size = min(auto_batch_size(m, cache_dir) for m in models)
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            shared = [size]
            dist.broadcast_object_list(shared, src=0)
            size = int(shared[0])
    return size


def _reduced_precision_attributor(attributor: Any, config: RunConfig, world: Any, use_cache: bool) -> tuple[Any, bool]:
    """Under reduced precision attributions stay fp32; with ``--reduced-precision-gradients`` they
    do not (with a warning), and the attribution cache is not used (its maps are fp32 maps)."""
    from harness.execution import FullPrecisionAttributor

    if not config.execution.reduced_precision_gradients:
        return FullPrecisionAttributor(attributor), use_cache
    if world.is_main:
        warn(f"--reduced-precision-gradients: attributor {attributor.id} runs in {config.execution.precision}; "
             "reduced-precision input gradients are not faithful (bf16: cosine 0.81 to fp32); "
             "the attribution cache is not used for this run")
    return attributor, False


def evaluate_pending(session: Session) -> None:
    """Evaluate this rank's samples that the samples file lacks (all of them without ``--resume``),
    appending one line per sample after every batch."""
    from harness import distributed

    run, world, config = session.run, session.world, session.run.config
    if config.resume:
        if world.is_main and not session.samples_file.path.exists():
            note = explain_fresh_start(Path(config.out), run.run_id, run.stamp)
            if note:
                warn(note)
        done = {r["sample_id"] for r in read_lines(session.samples_file.path, run.stamp, repair=world.is_main)}
        done |= {r["sample_id"] for r in read_lines(session.own_file.path, run.stamp, repair=True)}
    else:
        if world.is_main:
            session.samples_file.reset()
        session.own_file.reset()
        done = set()
    distributed.barrier(world)
    mine = run.samples[world.rank :: world.size]
    todo = [s for s in mine if s.id not in done]
    bar = progress(len(mine), f"{run.metric.id} {'+'.join(config.models)}", config.quiet or not world.is_main)
    bar.update(len(mine) - len(todo))
    images_per_batch = max(1, run.metric.images_per_batch(session.ctx.batch_size))
    for start in range(0, len(todo), images_per_batch):
        kept, images = _load_images(run, todo[start : start + images_per_batch])
        if kept:
            batch = Batch(samples=kept, images=images, seeds=[sample_seed(config.seed, s.id) for s in kept])
            records = run.metric.evaluate(batch, session.ctx)
            if len(records) != len(kept):
                raise RuntimeError(f"metric {run.metric.id} returned {len(records)} records for {len(kept)} samples")
            session.own_file.append([make_line(s, r, run.stamp) for s, r in zip(kept, records)])
        bar.update(min(images_per_batch, len(todo) - start))
    bar.close()


def execute(run: ResolvedRun, registry: Registry | None = None) -> Path | None:
    """Evaluate ``run`` (resuming if asked), write its samples and result files, return the result path.

    Output folders are checked and the run id locked before any model loads. Under torchrun every
    rank evaluates its share of the samples; rank 0 merges and returns the result path, the other
    ranks return None.
    """
    from harness import distributed
    from harness.allocator import tune_allocator
    from harness.locking import RunLock
    from harness.outputs import disk_full_is_one_line, remove_stale_temp_files

    tune_allocator()
    reg = registry or get_registry()
    config = run.config
    started, started_at = time.time(), datetime.now(timezone.utc).isoformat(timespec="microseconds")
    world = distributed.current()
    device = distributed.device_for(world, resolve_device(config.device))
    check_outputs(config, needs_cache=run.attributor is not None and config.cache)
    lock = RunLock(Path(config.out), run.run_id)
    if world.is_main:
        lock.acquire()
        remove_stale_temp_files(Path(config.out), run.run_id)
    try:
        with disk_full_is_one_line():
            distributed.start(world, device)
            session = open_session(run, reg, world, device)
            evaluate_pending(session)
            distributed.barrier(world)
            if not world.is_main:
                distributed.stop(world)
                return None
            if world.distributed:
                parts = [rank_file(Path(config.out), run.run_id, distributed.World(r, world.size)) for r in range(world.size)]
                merge_rank_files(session.samples_file, parts, run.samples, run.stamp)
            distributed.stop(world)
            return finish(session, reg, started, started_at)
    finally:
        lock.release()


def finish(session: Session, reg: Registry, started: float, started_at: str) -> Path:
    """Summarise the samples file into the result file.

    Samples with a non-finite per-sample value are left out of the summary and counted in
    ``values["n_nonfinite"]``; when none is left, or the summary itself is not a finite number, the
    run is recorded with status "error" and stops with one line.
    """
    run, config = session.run, session.run.config
    order = {s.id: i for i, s in enumerate(run.samples)}
    written = read_lines(session.samples_file.path, run.stamp)
    records = in_sample_order(written, order)
    if records != written:  # resumed out of order: leave the file as an uninterrupted run writes it
        from harness.results import atomic_write_text

        atomic_write_text(session.samples_file.path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    if not records:
        raise HarnessError("no sample could be evaluated (every image was unreadable)")
    finite = [r for r in records if "nonfinite" not in r]
    n_nonfinite = len(records) - len(finite)
    if not finite:
        first = records[0]
        key, what = next(iter(first["nonfinite"].items()))
        _fail(run, f"every sample ({len(records)}) gave a non-finite value (e.g. {first['sample_id']}: {key} is {what})")
    summary: Summary = run.metric.summarize(finite, session.ctx)
    if summary.value is None or not math.isfinite(summary.value):
        _fail(run, f"metric {run.metric.id} summarised {len(finite)} sample(s) to {summary.value}, not a finite number")
    if n_nonfinite:
        warn(f"{n_nonfinite} sample(s) gave non-finite values and are left out of the mean "
             f"(\"nonfinite\" in {session.samples_file.path.name})")
    result = Result(
        schema_version=SCHEMA_VERSION,
        run_id=run.run_id,
        models=[m.provenance() for m in session.models],
        metric={
            "id": run.metric.id,
            "version": run.metric.version,
            "higher_is_better": run.metric.higher_is_better,
            "options": run.metric.options.model_dump(mode="json"),
        },
        attributor=_component_entry(run.attributor),
        masker=_component_entry(run.masker),
        dataset={
            "id": config.data,
            "n_samples": len(finite),
            "sample_ids_sha256": sample_ids_sha256(run.samples),
            "samples_sha256": run.identity["dataset"]["samples_sha256"],
            "options": run.identity["dataset"]["options"],
            **({"content_identity": content} if (content := _content_identity(run.dataset)) else {}),
        },
        value=summary.value,
        stderr=summary.stderr,
        values={**summary.values, "n_nonfinite": n_nonfinite},
        artifacts=summary.artifacts,
        provenance={
            **_provenance(config, session.device, reg, started, started_at),
            **execution_provenance(session),
            "attribution_cache": None if session.cache is None else {
                "path": str(session.cache.root), "hits": session.cache.stats.hits, "misses": session.cache.stats.misses,
            },
            "weights_files_sha256": run.stamp.weights_sha256,
            "run_sha256": run.stamp.run_sha256,
            "run_config": replay_config(run),
            **({"python_objects": list(config.python_objects)} if config.python_objects else {}),
        },
        status="ok",
    )
    return write_result(result, Path(config.out))


def _fail(run: ResolvedRun, reason: str) -> None:
    """Record ``run`` as failed (status "error") and stop with one line."""
    path = write_error_result(run.config, reason, run)
    raise HarnessError(f"{reason}; recorded with status error in {path}")


def run(config: RunConfig, registry: Registry | None = None) -> Path | None:
    """Resolve and execute ``config``; return the result file's path."""
    return execute(resolve(config, registry), registry)


def rank_file(out: Path, run_id: str, world: Any) -> SamplesFile:
    """The samples file one rank of a distributed run writes."""
    return SamplesFile(out / f"{run_id}.samples.rank{world.rank}-of-{world.size}.jsonl")


def merge_rank_files(target: SamplesFile, parts: list[SamplesFile], samples: list[Sample], stamp: Stamp | None = None) -> None:
    """Merge ``target``'s records and the ranks' into ``target`` (sample order, no duplicates), then
    delete the rank files. The merged file is written atomically before any rank file is removed."""
    from harness.results import atomic_write_text

    order = {s.id: i for i, s in enumerate(samples)}
    merged = in_sample_order([r for part in [target, *parts] for r in read_lines(part.path, stamp)], order)
    atomic_write_text(target.path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in merged))
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
        dataset={"id": config.data, "n_samples": 0,
                 **({k: identity["dataset"][k] for k in ("sample_ids_sha256", "samples_sha256")} if run else {"sample_ids_sha256": ""})},
        value=None,
        stderr=None,
        values={},
        artifacts={},
        provenance={
            "harness": __version__, "plugins": {}, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "device": config.device, "seed": config.seed, "batch_size": _recorded_batch_size(config),
            "started_at": now, "duration_s": 0.0, "argv": config.argv or sys.argv,
        },
        status="error",
        error=message,
    )
    return write_result(result, Path(config.out))
