"""Expanding a registry.toml suite into runs, and running them so one failure does not stop the rest."""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.registry import Registry
from harness.runner import RunConfig


def expand_suite(name: str, base: RunConfig, reg: Registry) -> list[RunConfig]:
    """Models x metrics x attributors x maskers of suite ``name``, as run configurations.

    A metric that compares models (``min_models >= 2``) gets all of the suite's models in one run;
    attributors and maskers apply only to metrics that take them. ``attributors = "*"`` means every
    installed attributor that runs with its default options (see :func:`every_attributor`).
    ``options`` maps a metric id to extra ``-o`` strings for its runs; ``metric_models`` maps a metric
    id to the models it runs on instead of ``models``. ``--model`` (``base.models``) replaces the
    suite's models, ``metric_models`` included.
    """
    suite = reg.suite(name)
    models: list[str] = list(base.models) or list(suite.get("models", []))
    metrics: list[str] = list(suite.get("metrics", []))
    if not models or not metrics:
        raise HarnessError(f"suite {name!r} needs 'models' and 'metrics'")
    per_metric: dict[str, list[str]] = dict(suite.get("options", {}))
    models_for: dict[str, list[str]] = dict(suite.get("metric_models", {}))
    configs = []
    used: set[str] = set()
    for metric_id in metrics:
        metric = reg.get("metric", metric_id)
        chosen = list(base.models) if base.models else list(models_for.get(metric_id, models))
        groups = [chosen] if metric.min_models >= 2 else [[m] for m in chosen]
        attributors = suite.get("attributors") if metric.needs_attributor else None
        if attributors == "*":
            attributors = every_attributor(reg)
        elif isinstance(attributors, str):
            raise HarnessError(f"suite {name!r}: attributors is a list of ids or \"*\" (every installed attributor)")
        maskers = suite.get("maskers") if metric.needs_masker else None
        for group in groups:
            for attributor in attributors or [None]:
                for masker in maskers or [None]:
                    fields = _option_fields(reg, metric, attributor, masker)
                    mine = [pair for pair in base.options if _accepts(pair, fields)]
                    used.update(mine)
                    configs.append(
                        dataclasses.replace(
                            base,
                            models=list(group),
                            metric=metric_id,
                            attributor=attributor,
                            masker=masker,
                            options=[*per_metric.get(metric_id, []), *mine],
                            data=base.data or suite.get("data", "samples"),
                        )
                    )
    unused = [pair for pair in base.options if pair not in used]
    if unused:
        raise HarnessError(f"option {unused[0]!r} fits no entry of suite {name!r}")
    return configs


def every_attributor(reg: Registry) -> list[str]:
    """Ids of every installed attributor (bundled, bridged, third-party) that runs with its default
    options: those with a required option (``maps`` needs a PATH) are left out."""
    return [
        cid for cid, entry in sorted(reg.components["attributor"].items())
        if not any(f.is_required() for f in entry.obj.Options.model_fields.values())
    ]


def _option_fields(reg: Registry, metric: Any, attributor: str | None, masker: str | None) -> dict[str, set[str]]:
    """Option names per target for one suite entry (defaults filled in as the run would)."""
    from harness.model import ModelOptions

    fields = {"metric": set(metric.Options.model_fields), "dataset": {"*"}, "model": set(ModelOptions.model_fields)}
    if metric.needs_attributor:
        fields["attributor"] = set(reg.get("attributor", attributor or metric.default_attributor).Options.model_fields)
    if metric.needs_masker:
        fields["masker"] = set(reg.get("masker", masker or metric.default_masker).Options.model_fields)
    return fields


def _accepts(pair: str, fields: dict[str, set[str]]) -> bool:
    """Whether a ``KEY=VALUE`` option applies to an entry with these option fields."""
    key = pair.partition("=")[0].strip()
    target, dot, name = key.partition(".")
    if dot:
        return target in fields and ("*" in fields[target] or name in fields[target])
    return any(key in names for t, names in fields.items() if t not in ("dataset", "model"))


def describe(config: RunConfig) -> str:
    """A short label for progress lines: metric model [attributor masker]."""
    extras = " ".join(x for x in (config.attributor, config.masker) if x)
    return f"{config.metric} {'+'.join(config.models)}" + (f" [{extras}]" if extras else "")


def error_message(exc: BaseException) -> str:
    """One line for a failed suite entry (the traceback's last frame for unexpected errors)."""
    if isinstance(exc, HarnessError):
        return str(exc)
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}{where}"


def suite_summary(outcomes: list[dict[str, Any]]) -> str:
    """'N ok, M failed' line."""
    ok = sum(o["status"] == "ok" for o in outcomes)
    skipped = sum(o["status"] == "skipped" for o in outcomes)
    failed = sum(o["status"] == "error" for o in outcomes)
    return f"suite: {ok} ok, {skipped} already done, {failed} failed"
