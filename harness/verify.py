"""``harness verify``: run a result's recorded configuration again on some of its samples and compare.

The configuration comes from the result's ``provenance.run_config``; the samples are a seeded choice
of K lines of its samples file (all by default). They are evaluated again through the runner's own
code path (the same session set-up, image loading, batching and per-sample lines; the attribution
cache is not used, so every attribution is recomputed) and compared with the recorded lines: the
prediction, which values were non-finite, and every value that all of the run's lines carry (its
per-sample values; entries only the first line of a batch carries are batch sums and depend on how
the samples were batched, so they are not compared; a metric may instead list its per-batch entries
in a ``batch_keys`` class attribute, and then every other value of a line is compared). Numbers agree when
``|recorded - recomputed| <= abs + rel * |recorded|`` with :data:`TOLERANCE`; strings, booleans and
nulls must be equal. The verdict goes to ``<run_id>.verification.json`` beside the result.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.results import is_result_file, sibling_path, verification_path

TOLERANCE = {"abs": 1e-5, "rel": 1e-4}
"""Float32 work batched differently (a subset is batched otherwise than the full run) and resumed
runs differ from an uninterrupted run by rounding only: measured below 1e-6 on the tests' models.
The bound is 10-100x that, and far below any real change (other weights, data or options move
per-sample values by 1e-3 or more)."""

MAX_LISTED = 20


class NotVerifiable(HarnessError):
    """A result that cannot be verified at all (a failed run, or one that records no configuration)."""


def _replay(result: Any, out: Path, device: str) -> Any:
    """The RunConfig recorded in ``result``, writing into ``out``."""
    from harness.execution import ExecutionMode
    from harness.runner import RunConfig

    recorded = getattr(result.provenance, "run_config", None)
    objects = getattr(result.provenance, "python_objects", None)
    if objects and recorded is None:
        raise NotVerifiable(f"{result.run_id}: made by harness.evaluate from Python objects ({', '.join(map(str, objects))}), "
                            "which verify cannot rebuild")
    if not isinstance(recorded, dict):
        raise NotVerifiable(
            f"{result.run_id}: the result records no run configuration (provenance.run_config; written by harness "
            f"{result.provenance.harness}); run it again with this harness to make it verifiable"
        )
    try:
        models = list(recorded["models"])
        files = list(recorded.get("weights") or [None] * len(models))
        if all(files):
            weights = [str(w) for w in files]
        else:
            weights = [f"{m}={w}" for m, w in zip(models, files) if w]
        return RunConfig(
            models=models, metric=recorded["metric"], attributor=recorded.get("attributor"),
            masker=recorded.get("masker"), data=recorded["data"], limit=recorded.get("limit"),
            batch_size="auto" if recorded.get("batch_size_auto") else int(recorded["batch_size"]), device=device, seed=int(recorded["seed"]), weights=weights,
            random_init=bool(recorded.get("random_init")), options=list(recorded.get("options") or []), out=out,
            quiet=True, on_bad_image="skip", cache=False, argv=["harness", "verify"],
            execution=ExecutionMode.from_record(recorded.get("execution")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HarnessError(f"{result.run_id}: provenance.run_config is damaged ({type(exc).__name__}: {exc})") from None


def _numbers_agree(a: Any, b: Any, worst: list[float]) -> bool:
    """Whether recorded ``a`` and recomputed ``b`` agree (recursively); the largest numeric
    difference seen is kept in ``worst[0]``."""
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        diff = abs(float(a) - float(b))
        worst[0] = max(worst[0], diff)
        return diff <= TOLERANCE["abs"] + TOLERANCE["rel"] * abs(float(a))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all([_numbers_agree(x, y, worst) for x, y in zip(a, b)])
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all([_numbers_agree(a[k], b[k], worst) for k in a])
    return a == b


def _difference(recorded: dict[str, Any], fresh: dict[str, Any], keys: list[str], worst: list[float]) -> str | None:
    """Why the recomputed line differs from the recorded one (None when it agrees)."""
    if set(recorded.get("nonfinite", {})) != set(fresh.get("nonfinite", {})):
        return f"non-finite values {sorted(recorded.get('nonfinite', {}))} recorded, {sorted(fresh.get('nonfinite', {}))} now"
    if not _numbers_agree(recorded.get("prediction"), fresh.get("prediction"), worst):
        return f"prediction {recorded.get('prediction')} recorded, {fresh.get('prediction')} now"
    for key in keys:
        if not _numbers_agree(recorded["values"].get(key), fresh["values"].get(key), worst):
            shown = lambda v: repr(v)[:60]  # noqa: E731
            return f"{key}: {shown(recorded['values'].get(key))} recorded, {shown(fresh['values'].get(key))} now"
    return None


def _versions(result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(versions the result was made with, versions now) of harness, torch and the plugins."""
    import torch

    from harness import __version__
    from harness.registry import get_registry

    now_plugins = {p.dist or p.name: p.version for p in get_registry().plugins if p.enabled and not p.errors}
    then = {"harness": result.provenance.harness, "torch": result.provenance.torch, "plugins": result.provenance.plugins}
    return then, {"harness": __version__, "torch": torch.__version__, "plugins": now_plugins}


def verify_result(path: Path, samples: int | None = None, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Verify the result file at ``path`` on ``samples`` of its samples (all by default); write and
    return the verification record."""
    from harness import distributed
    from harness.model import resolve_device
    from harness.progress import warn
    from harness.records import read_lines
    from harness.registry import get_registry
    from harness.results import atomic_write_text, read_result
    from harness.runner import check_outputs, evaluate_pending, open_session, resolve

    path = Path(path)
    result = read_result(path)
    if result.status != "ok":
        raise NotVerifiable(f"{path}: status {result.status!r}: only a finished run can be verified")
    if samples is not None and samples < 1:
        raise HarnessError(f"--samples must be at least 1, got {samples}")
    samples_path = sibling_path(path, result.run_id, ".samples.jsonl")
    run_sha = getattr(result.provenance, "run_sha256", None)
    recorded = [r for r in read_lines(samples_path) if run_sha is None or r.get("run_sha256") == run_sha]
    if not recorded:
        raise HarnessError(f"{path}: no per-sample lines of this run in {samples_path.name}; nothing to verify")
    every = set.intersection(*(set(r["values"]) for r in recorded))
    chosen = sorted(random.Random(seed).sample(range(len(recorded)), min(samples or len(recorded), len(recorded))))
    lines = [recorded[i] for i in chosen]

    reg = get_registry()
    metric_cls = reg.get("metric", result.metric.id)
    declared = getattr(metric_cls, "batch_keys", None)  # a metric may name its per-batch entries

    def keys_of(line: dict[str, Any]) -> list[str]:
        return sorted(every if declared is None else set(line["values"]) - set(declared))

    compared: set[str] = set()
    mismatches: list[dict[str, str]] = []
    worst = [0.0]
    with tempfile.TemporaryDirectory(prefix="harness-verify-") as scratch:
        config = _replay(result, Path(scratch), device)
        run = resolve(config, reg)
        by_id = {s.id: s for s in run.samples}
        todo = []
        for line in lines:
            sample = by_id.get(line["sample_id"])
            if sample is None:
                mismatches.append({"sample_id": line["sample_id"], "reason": "no longer a sample of the dataset"})
            elif run.stamp.samples[sample.id] != line.get("sample_sha256"):
                mismatches.append({"sample_id": sample.id, "reason": "the image's content changed"})
            else:
                todo.append(sample)
        if todo:
            subset = dataclasses.replace(run, samples=todo, all_samples=run.samples)
            check_outputs(config, needs_cache=False)
            world = distributed.World()
            session = open_session(subset, reg, world, resolve_device(device))
            evaluate_pending(session)
            fresh = {r["sample_id"]: r for r in read_lines(session.samples_file.path)}
            for line in lines:
                if line["sample_id"] not in {s.id for s in todo}:
                    continue
                again = fresh.get(line["sample_id"])
                compared.update(keys_of(line))
                reason = "could not be evaluated again" if again is None else _difference(line, again, keys_of(line), worst)
                if reason is not None:
                    mismatches.append({"sample_id": line["sample_id"], "reason": reason})

    then, now = _versions(result)
    same_versions = then == now
    if not same_versions:
        changed = [f"{k} {then[k]} -> {now[k]}" for k in ("harness", "torch") if then[k] != now[k]]
        if then["plugins"] != now["plugins"]:
            changed.append("plugins " + ", ".join(
                f"{d} {then['plugins'].get(d)} -> {now['plugins'].get(d)}"
                for d in sorted(set(then["plugins"]) | set(now["plugins"])) if then["plugins"].get(d) != now["plugins"].get(d)
            ))
        warn(f"{result.run_id} was made with other versions than this verification: {'; '.join(changed)}")
    record = {
        "run_id": result.run_id,
        "status": "passed" if not mismatches else "failed",
        "n_checked": len(lines),
        "n_mismatched": len(mismatches),
        "max_abs_diff": worst[0],
        "tolerance": dict(TOLERANCE),
        "harness": now["harness"],
        "torch": now["torch"],
        "same_versions": same_versions,
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "plugins": now["plugins"],
        "result_versions": then,
        "same_identity": run.run_id == result.run_id,
        "n_recorded": len(recorded),
        "selection_seed": seed,
        "compared": ["prediction", "nonfinite", *sorted(compared)],
        "checked_samples": [line["sample_id"] for line in lines],
        "mismatches": mismatches[:MAX_LISTED],
    }
    import json

    atomic_write_text(verification_path(path, result.run_id), json.dumps(record, indent=2) + "\n")
    return record


def result_files(target: Path) -> list[Path]:
    """``target`` itself, or the result files in the folder ``target`` (recursively)."""
    target = Path(target)
    if target.is_dir():
        return sorted(p for p in target.rglob("*.json") if is_result_file(p))
    if target.is_file():
        return [target]
    raise HarnessError(f"no such file or folder: {target}")


def summary_line(record: dict[str, Any], where: Path) -> str:
    """One line for a verification record."""
    tol = f"abs {record['tolerance']['abs']:g} + rel {record['tolerance']['rel']:g}"
    if record["status"] == "passed":
        return (f"passed: {record['run_id']}: {record['n_checked']} sample(s) agree (max |diff| {record['max_abs_diff']:.3g}, "
                f"tolerance {tol}) -> {where}")
    first = record["mismatches"][0] if record["mismatches"] else {"sample_id": "?", "reason": "?"}
    return (f"FAILED: {record['run_id']}: {record['n_mismatched']} of {record['n_checked']} sample(s) differ "
            f"(first: {first['sample_id']}: {first['reason']}) -> {where}")
