"""``-o KEY=VALUE`` options: parsing, routing to components, and validation errors as one line."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from harness.components import Component, Options
from harness.errors import HarnessError

OPTION_TARGETS = ("metric", "attributor", "masker", "dataset", "model")


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, booleans, lists, null), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: list[str], fields: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    """Route ``KEY=VALUE`` pairs to components.

    ``KEY`` is ``target.name`` (target one of metric, attributor, masker, dataset, model) or a bare ``name``
    that exactly one component of the run has (``fields`` maps target to its option names).
    """
    routed: dict[str, dict[str, Any]] = {t: {} for t in OPTION_TARGETS}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HarnessError(f"malformed option {pair!r}: expected KEY=VALUE, e.g. -o metric.steps=50")
        target, dot, name = key.partition(".")
        if dot:
            if target not in OPTION_TARGETS:
                raise HarnessError(
                    f"option {key!r}: unknown target {target!r}; use one of {', '.join(OPTION_TARGETS)}"
                )
            if target not in fields:
                raise HarnessError(f"option {key!r}: this run has no {target}")
        else:
            owners = [t for t, names in fields.items() if key in names]
            if len(owners) != 1:
                where = "no component" if not owners else f"several components ({', '.join(owners)})"
                raise HarnessError(f"option {key!r} matches {where} of this run; write it as TARGET.{key}")
            target, name = owners[0], key
        routed[target][name] = parse_value(raw)
    return routed


def build_options(options_cls: type[Options], values: dict[str, Any], label: str) -> Options:
    """Validate ``values`` into ``options_cls``; a bad option raises one line naming it."""
    try:
        return options_cls(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
            if err["type"] == "extra_forbidden":
                known = ", ".join(options_cls.model_fields) or "none"
                problems.append(f"unknown option {label}.{name} (known: {known})")
            else:
                problems.append(f"option {label}.{name}: {err['msg']}{got}")
        raise HarnessError("; ".join(problems)) from None


def build_component(cls: type[Component], values: dict[str, Any], label: str) -> Component:
    """Instantiate ``cls`` with validated options; a bad option raises one line naming it."""
    return cls(build_options(cls.Options, values, label))
