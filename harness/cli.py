"""The ``harness`` command line: run, list, plugins, leaderboard, validate, verify."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from harness import __version__
from harness.errors import HarnessError

KINDS = ("models", "attributors", "maskers", "metrics", "datasets", "suites")


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harness")
def cli() -> None:
    """Evaluate how vision models decide: explanations, faithfulness, representations, robustness."""


# -- run -------------------------------------------------------------------------------------------
@cli.command()
@click.option("--model", "models", multiple=True, metavar="ID", help="Model id (repeat for multi-model metrics).")
@click.option("--metric", metavar="ID", help="Metric id.")
@click.option("--suite", metavar="NAME", help="Run every entry of a registry.toml suite instead.")
@click.option("--attributor", metavar="ID", help="Attributor id, or maps:PATH for maps computed elsewhere (metrics that need one; default per metric).")
@click.option("--masker", metavar="ID", help="Masker id: blur, black, mean, noise, road (granularity via -o masker.granularity=...).")
@click.option("--data", default=None, metavar="SPEC", help="samples (default) | imagenet:PATH | imagenet-c:PATH | folder:PATH | imagefolder:PATH (class sub-folders; -o dataset.classes=sorted|imagenet|FILE).")
@click.option("--limit", type=int, default=None, help="Use only the first N samples.")
@click.option("--batch-size", default="auto", show_default=True, metavar="auto|N",
              help="Rows per forward pass and images per metric step. auto: the size fastest per image on this CPU "
                   "(short calibration, cached) or the largest that fits on the GPU; metric steps stay at 32 images.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="bf16/fp16: autocast for forward-only work (sweeps, searches, features); attributions and gradients "
                   "stay fp32. Part of the run id; marked [bf16] in the leaderboard.")
@click.option("--reduced-precision-gradients", is_flag=True,
              help="With --precision bf16/fp16, also run attributors and gradients in it (not faithful; warns).")
@click.option("--memory-format", type=click.Choice(["auto", "channels_last", "contiguous"]), default="auto", show_default=True,
              help="auto: channels_last for CNNs, contiguous for ViTs (results equal up to float rounding).")
@click.option("--fold-batchnorm/--no-fold-batchnorm", default=True, show_default=True,
              help="Run plain forward and input-gradient passes of CNNs on a copy with BatchNorm merged into the "
                   "convolutions (results equal up to float rounding; 1.3x faster on CPU). Cached attributions are "
                   "shared with unfolded runs: add --no-cache for an unfolded reference.")
@click.option("--compile", "compile_model", is_flag=True,
              help="torch.compile the models (pays on long forward-heavy runs; compiling takes tens of seconds).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:K.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random choice.")
@click.option("--weights", "weights", multiple=True, type=click.Path(), help="Weights file per --model in order, or ID=PATH for a named model (.safetensors or weights-only torch file).")
@click.option("--random-init", is_flag=True, help="Use untrained weights on purpose (marked in every output).")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help="Component option, e.g. -o metric.steps=50 -o masker.granularity=patch:8.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results"), show_default=True, help="Output folder.")
@click.option("--resume", is_flag=True, help="Keep samples already in the samples file (suites: skip finished entries).")
@click.option("--on-bad-image", type=click.Choice(["skip", "stop"]), default="skip", show_default=True, help="Unreadable image: skip it with a warning, or stop.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Attribution cache folder (default: $HARNESS_CACHE_DIR or ~/.cache/harness/attributions).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write cached attributions.")
@click.option("--plot", "make_plots", is_flag=True, help="Also write the metric's PNG plots (as `harness plot`).")
@click.option("--launcher", type=click.Choice(["none", "local", "torchrun"]), default="none", show_default=True,
              help="Start --nproc processes that shard the samples (gloo on CPU, NCCL on GPUs): local starts them "
                   "directly (faster start), torchrun through torch.distributed.run.")
@click.option("--nproc", type=int, default=2, show_default=True, help="Processes with --launcher local or torchrun.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def run(**kw: Any) -> None:
    """Run a metric on models and data; write <out>/<run_id>.json and its samples file."""
    from harness.execution import ExecutionMode, parse_batch_size
    from harness.runner import RunConfig

    if kw["launcher"] != "none":
        from harness.launch import launch_local, launch_torchrun, strip_launcher_args

        launch = launch_local if kw["launcher"] == "local" else launch_torchrun
        sys.exit(launch(kw["nproc"], strip_launcher_args(_RAW_ARGS)))

    if bool(kw["suite"]) == bool(kw["metric"]):
        raise HarnessError("give either --metric (with --model) or --suite")
    if kw["metric"] and not kw["models"]:
        raise HarnessError("--metric needs at least one --model")
    base = RunConfig(
        models=list(kw["models"]),
        metric=kw["metric"] or "",
        attributor=kw["attributor"],
        masker=kw["masker"],
        data=kw["data"] or ("" if kw["suite"] else "samples"),
        limit=kw["limit"],
        batch_size=parse_batch_size(kw["batch_size"]),
        device=kw["device"],
        seed=kw["seed"],
        weights=list(kw["weights"]),
        random_init=kw["random_init"],
        options=list(kw["options"]),
        out=kw["out"],
        resume=kw["resume"],
        quiet=kw["quiet"],
        on_bad_image=kw["on_bad_image"],
        argv=["harness", *sys.argv[1:]],
        cache=not kw["no_cache"],
        cache_dir=kw["cache_dir"],
        in_suite=bool(kw["suite"]),
        execution=ExecutionMode(precision=kw["precision"], memory_format=kw["memory_format"], compile=kw["compile_model"],
                                reduced_precision_gradients=kw["reduced_precision_gradients"],
                                fold_batchnorm=kw["fold_batchnorm"]),
    )
    if kw["suite"]:
        _run_suite(kw["suite"], base, kw["make_plots"])
    else:
        _run_one(base, kw["make_plots"])


def _summary_line(path: Path) -> str:
    from harness.results import read_result

    result = read_result(path)
    err = f" ± {result.stderr:.4f}" if result.stderr is not None else ""
    value = f"{result.value:.4f}" if result.value is not None else "n/a"
    models = "+".join(m.id for m in result.models)
    n = result.dataset.n_samples
    values = result.values or {}  # metrics that score only some samples: localisation (boxes), accuracy (labels)
    scored = values.get("n_scored", values.get("n_labelled"))
    count = f"n={scored} of {n}" if isinstance(scored, int) and not isinstance(scored, bool) and scored != n else f"n={n}"
    return f"{result.metric.id} {models}: {value}{err} ({count}) -> {path}"


def _run_one(config: Any, make_plots: bool) -> None:
    from harness.runner import run as run_config

    path = run_config(config)
    if path is None:  # a non-zero rank of a distributed run: rank 0 reports
        return
    if make_plots:
        _plot(path)
    click.echo(_summary_line(path))


def _plot(path: Path) -> None:
    from harness.plotting import plot_result

    for name, relative in plot_result(path).items():
        click.echo(f"plot {name}: {path.parent / relative}", err=True)


def _run_suite(name: str, base: Any, make_plots: bool) -> None:
    from harness.registry import get_registry
    from harness.results import read_result
    from harness.runner import check_weight_ids, execute, resolve, weight_ids, write_error_result
    from harness.suites import describe, error_message, expand_suite, suite_summary

    reg = get_registry()
    outcomes = []
    configs = expand_suite(name, base, reg)
    named = weight_ids(list(base.weights)) if base.weights else None
    if named is not None:
        check_weight_ids(named, [m for c in configs for m in c.models], f"suite {name!r}")
    for config in configs:
        resolved = None
        try:
            resolved = resolve(config, reg)
            done = Path(config.out) / f"{resolved.run_id}.json"
            if config.resume and done.exists() and read_result(done).status == "ok":
                outcomes.append({"status": "skipped"})
                click.echo(f"done already: {describe(config)} -> {done}")
                continue
            path = execute(resolved, reg)
            if path is None:
                continue
            if make_plots:
                _plot(path)
            outcomes.append({"status": "ok"})
            click.echo(_summary_line(path))
        except Exception as exc:  # a suite records failures and goes on
            message = error_message(exc)
            path = write_error_result(config, message, resolved)
            outcomes.append({"status": "error"})
            click.echo(f"failed: {describe(config)}: {message} -> {path}", err=True)
    click.echo(suite_summary(outcomes))
    if any(o["status"] == "error" for o in outcomes):
        sys.exit(1)


# -- list / plugins ----------------------------------------------------------------------------------
def _component_rows(kind: str) -> list[dict[str, Any]]:
    from harness.registry import get_registry

    reg = get_registry()
    singular = kind[:-1]
    rows: list[dict[str, Any]] = []
    if kind == "suites":
        for name, suite in sorted(reg.suites.items()):
            rows.append({"id": name, "description": suite.get("description", ""), "models": suite.get("models", []),
                         "metrics": suite.get("metrics", []), "attributors": suite.get("attributors", []),
                         "maskers": suite.get("maskers", [])})
        return rows
    if kind == "models":
        for model_id in reg.ids("model"):
            spec = reg.model_spec(model_id)
            rows.append({"id": model_id, "provider": reg.provider("model", model_id), "description": spec.description,
                         "weights": spec.weights, "version": spec.version})
        return rows
    for cid, entry in sorted(reg.components[singular].items()):
        cls = entry.obj
        row = {"id": cid, "provider": entry.provider, "version": cls.version, "description": cls.summary(),
               "options": cls.option_fields()}
        if singular == "metric":
            row.update(higher_is_better=cls.higher_is_better, needs_attributor=cls.needs_attributor,
                       needs_masker=cls.needs_masker, models=[cls.min_models, cls.max_models], citation=cls.citation)
        rows.append(row)
    return rows


def _layer_rows(model_id: str, random_init: bool) -> list[dict[str, Any]]:
    """Every module of a model (definition order) with its per-image output shape and the metrics
    whose default layer selection includes it (metrics that define a ``default_layers(module)`` classmethod)."""
    import torch

    from harness.model import load_model
    from harness.registry import get_registry

    reg = get_registry()
    loaded = load_model(reg.model_spec(model_id), random_init=random_init)
    root = loaded.module
    defaults: dict[str, list[str]] = {}
    for metric_id, entry in sorted(reg.components["metric"].items()):
        chooser = getattr(entry.obj, "default_layers", None)
        if callable(chooser):
            for layer in chooser(root):
                defaults.setdefault(layer, []).append(metric_id)
    shapes: dict[str, Any] = {}

    def shape_of(value: Any) -> Any:
        value = value[0] if isinstance(value, (tuple, list)) and value else value
        return list(value.shape[1:]) if isinstance(value, torch.Tensor) else None

    def record(layer: str, value: Any) -> None:
        shapes.setdefault(layer, shape_of(value))  # hooks must return None (a value would replace the output)

    handles = []
    for name, module in root.named_modules():
        if name:
            handles.append(module.register_forward_hook(lambda m, a, out, n=name: record(n, out)))
            if f"{name}:in" in defaults:
                handles.append(module.register_forward_pre_hook(lambda m, a, n=f"{name}:in": record(n, a)))
    try:
        with torch.inference_mode():
            root(torch.zeros(1, *loaded.input_size, device=loaded.device))
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, module in root.named_modules():
        if not name:
            continue
        for layer, kind in ((f"{name}:in", f"input of {type(module).__name__}"), (name, type(module).__name__)):
            if layer == name or layer in defaults:
                rows.append({"layer": layer, "type": kind, "shape": shapes.get(layer), "default_for": defaults.get(layer, [])})
    return rows


@cli.command(name="list")
@click.argument("kind", required=False, type=click.Choice([*KINDS, "layers"]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--model", "model_id", metavar="ID", help="With `layers`: the model whose layers (module names) to list.")
@click.option("--random-init", is_flag=True, help="With `layers`: build the model untrained (no weights needed).")
def list_components(kind: str | None, as_json: bool, model_id: str | None, random_init: bool) -> None:
    """List registered components (all kinds, or one). Any timm model id also works as a model.

    `harness list layers --model ID` lists a model's module names (for `-o metric.layers=GLOB,...`; NAME:in is a
    module's input), their per-image output shapes and which metrics select them by default.
    """
    if kind == "layers":
        if not model_id:
            raise HarnessError("`harness list layers` needs --model ID")
        rows = _layer_rows(model_id, random_init)
        if as_json:
            _echo_json(rows)
            return
        from tabulate import tabulate

        table = [[r["layer"], r["type"], "x".join(map(str, r["shape"])) if r["shape"] else "", ", ".join(r["default_for"])] for r in rows]
        click.echo(tabulate(table, headers=["layer", "type", "shape", "default for"], tablefmt="plain"))
        return
    if model_id or random_init:
        raise HarnessError("--model and --random-init apply only to `harness list layers`")
    kinds = [kind] if kind else list(KINDS)
    data = {k: _component_rows(k) for k in kinds}
    if as_json:
        _echo_json(data[kind] if kind else data)
        return
    from tabulate import tabulate

    for k in kinds:
        click.echo(f"{k}:")
        table = [[r["id"], r.get("provider", ""), r.get("description", "")] for r in data[k]]
        click.echo(tabulate(table, headers=["id", "provider", "description"], tablefmt="plain") if table else "  (none)")
        click.echo()
    if kind in (None, "models"):
        click.echo("Any timm model id (e.g. resnet50.a1_in1k, test_vit) also works as --model.")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """Installed plugins: distribution, version, components and errors."""
    from harness.registry import get_registry

    infos = get_registry().plugins
    if as_json:
        _echo_json([p.to_json() for p in infos])
        return
    for p in infos:
        state = "disabled" if not p.enabled else ("ERROR" if p.errors else ("skipped" if p.skipped else "ok"))
        click.echo(f"{p.name} ({p.dist} {p.version}) [{state}] {p.module}")
        for kind, ids in sorted(p.components.items()):
            click.echo(f"    {kind}: {', '.join(ids)}")
        for error in p.errors:
            click.echo(f"    error: {error}")
        if p.skipped and p.enabled:
            click.echo(f"    skipped: {p.skipped}")


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
def plot(results: tuple[Path, ...]) -> None:
    """Write the PNG plots of result files (curves, attribution overlays, heatmaps) next to them."""
    from harness.leaderboard import find_result_files
    from harness.results import read_result

    files = find_result_files(list(results))
    if not files:
        raise HarnessError(f"no result files in {', '.join(map(str, results))}")
    for path in files:
        if read_result(path).status != "ok":  # validated: the run id is a plain file name
            click.echo(f"skipped {path}: status error, nothing to plot", err=True)
            continue
        _plot(path)


@cli.command()
@click.argument("action", type=click.Choice(["info", "clear"]))
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Cache folder (default as for `harness run`).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache(action: str, cache_dir: Path | None, as_json: bool) -> None:
    """Show (info) or empty (clear) the attribution cache."""
    from harness.cache import AttributionCache, default_cache_dir

    store = AttributionCache(cache_dir or default_cache_dir())
    if action == "clear":
        removed = store.clear()
        data: dict[str, Any] = {"path": str(store.root), "removed": removed}
        click.echo(json.dumps(data) if as_json else f"removed {removed} cached attribution(s) from {store.root}")
        return
    data = store.info()
    click.echo(json.dumps(data) if as_json else f"{data['path']}: {data['entries']} attribution(s), {data['bytes'] / 1e6:.1f} MB")


# -- verify ------------------------------------------------------------------------------------------
@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--samples", "n_samples", type=int, default=None, metavar="K", help="Check K of the run's samples (a seeded choice); default: all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the choice of samples.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:K.")
def verify(target: Path, n_samples: int | None, seed: int, device: str) -> None:
    """Run a result's recorded configuration again on its samples and compare the per-sample values.

    TARGET is a result file or a folder of them. Writes <run_id>.verification.json beside each result;
    exits 1 if any verification failed.
    """
    from harness.verify import NotVerifiable, result_files, summary_line, verification_path, verify_result

    single = Path(target).is_file()
    failed, verified = False, 0
    for path in result_files(target):
        try:
            record = verify_result(path, n_samples, seed, device)
        except HarnessError as exc:
            if single:
                raise
            failed |= not isinstance(exc, NotVerifiable)
            click.echo(f"{'skipped' if isinstance(exc, NotVerifiable) else 'error'}: {exc}", err=True)
            continue
        verified += 1
        failed |= record["status"] != "passed"
        click.echo(summary_line(record, verification_path(path, record["run_id"])))
    if not verified and not failed:
        raise HarnessError(f"no verifiable result files in {target}")
    if failed:
        sys.exit(1)


# -- leaderboard / validate --------------------------------------------------------------------------
@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["markdown", "html", "csv", "json", "latex"]), default="markdown", show_default=True,
              help="latex: booktabs tables (best per column in bold) for a paper.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE instead of stdout.")
@click.option("--group-by", "group_by", type=click.Choice(["sample-set", "dataset", "none"]), default="sample-set", show_default=True,
              help="One table per sample set (dataset id + sample digests); coarser views, labelled as such: per dataset id, or one table.")
def leaderboard(paths: tuple[Path, ...], fmt: str, output: Path | None, group_by: str) -> None:
    """Build the leaderboard from result files (folders are searched; default ./results)."""
    from harness import leaderboard as lb
    from harness.results import atomic_write_text

    roots = list(paths) or [Path("results")]
    files = lb.find_result_files(roots)
    if not files:
        raise HarnessError(f"no result files in {', '.join(map(str, roots))}")
    text = lb.render(lb.load(files, group_by), fmt)
    if output:
        atomic_write_text(output, text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--site", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the site to (new, empty, or an earlier site, which is replaced).")
@click.option("--group-by", "group_by", type=click.Choice(["sample-set", "dataset", "none"]), default="sample-set",
              show_default=True, help="The tables' grouping, as for `harness leaderboard`.")
@click.option("--title", default="harness leaderboard", show_default=True, help="The site's title.")
@click.option("--sample-rows", type=int, default=1000, show_default=True,
              help="Per-sample rows shown on a result page (the whole samples file is always a download).")
def publish(paths: tuple[Path, ...], site: Path, group_by: str, title: str, sample_rows: int) -> None:
    """Write a static site from result files (folders are searched; default ./results).

    The index has one table per comparable group; every value links to a page with the result's
    configuration, provenance, values, plots and per-sample table; metrics and attributors get pages
    too. Open SITE/index.html, or serve SITE from any static host (e.g. GitHub Pages).
    """
    from harness.publish import publish as publish_site

    report = publish_site(list(paths) or [Path("results")], site, group_by=group_by, title=title, sample_rows=sample_rows)
    skipped = f"; {len(report.skipped)} invalid file(s) left out" if report.skipped else ""
    click.echo(f"wrote {report.site / 'index.html'}: {report.n_results} result(s), {report.n_tables} table(s), "
               f"{report.n_pages} page(s), index {report.index_bytes / 1000:.1f} kB{skipped}")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(files: tuple[Path, ...], as_json: bool) -> None:
    """Check result files against the schema: one line per file; exit 1 if any is invalid."""
    from harness.leaderboard import find_result_files
    from harness.results import read_result

    found = find_result_files(list(files))
    if not found:
        raise HarnessError(f"no result files in {', '.join(map(str, files))}")
    report = []
    for path in found:
        try:
            read_result(path)
            report.append({"file": str(path), "ok": True, "error": None})
        except HarnessError as exc:
            report.append({"file": str(path), "ok": False, "error": str(exc)})
        except Exception as exc:  # never stop at one hostile file
            report.append({"file": str(path), "ok": False, "error": f"{path}: cannot validate ({type(exc).__name__}: {exc})"})
    if as_json:
        _echo_json(report)
    else:
        for item in report:
            click.echo(f"ok: {item['file']}" if item["ok"] else f"invalid: {item['error']}")
    if not all(item["ok"] for item in report):
        sys.exit(1)


_RAW_ARGS: list[str] = []


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    global _RAW_ARGS
    _RAW_ARGS = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="harness", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("harness: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"harness: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except HarnessError as exc:
        click.echo(f"harness: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("harness: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("HARNESS_DEBUG"):
            raise
        from harness.suites import error_message

        click.echo(f"harness: internal error: {error_message(exc)} (set HARNESS_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
