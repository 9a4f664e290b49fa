"""Lines of the samples file: what each carries, non-finite values, and reading a damaged file.

Every line is one sample: ``sample_id``, ``label``, ``prediction``, ``values`` (the metric's
per-sample record), plus what ties it to its run: ``sample_sha256`` (the image's content digest),
``weights_sha256`` (one digest per model: the weights file's sha256, or null for default /
random-init weights) and ``run_sha256`` (the full digest of the run's identity). A per-sample value
(a number directly under ``values``) that is NaN or infinite is stored as null and named in
``"nonfinite": {key: "nan" | "inf" | "-inf"}``; such samples are left out of the headline.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.progress import warn


@dataclass(frozen=True)
class Stamp:
    """What a line must carry to belong to a run."""

    run_sha256: str
    weights_sha256: list[str | None]
    samples: dict[str, str]  # sample id -> content digest


def _text(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def nonfinite(record: dict[str, Any]) -> dict[str, str]:
    """The per-sample values of a metric's record that are not finite: {key: "nan"|"inf"|"-inf"}."""
    found = {}
    values = record.get("values") or {}
    for key, value in [("prediction", record.get("prediction")), *values.items()]:
        if isinstance(value, float) and not math.isfinite(value):
            found[key] = _text(value)
    return found


def make_line(sample: Any, record: dict[str, Any], stamp: Stamp) -> dict[str, Any]:
    """The samples-file line of one evaluated sample."""
    values = record.get("values", {})
    if not isinstance(values, dict):
        raise TypeError(f"a metric record's values must be a dict, got {type(values).__name__}")
    line = {
        "sample_id": sample.id,
        "label": sample.label,
        "prediction": record.get("prediction"),
        "values": values,
        "sample_sha256": stamp.samples[sample.id],
        "weights_sha256": stamp.weights_sha256,
        "run_sha256": stamp.run_sha256,
    }
    bad = nonfinite(record)
    if bad:
        line["nonfinite"] = bad
    return line


def foreign(line: dict[str, Any], stamp: Stamp) -> str | None:
    """Why ``line`` does not belong to the run of ``stamp`` (None when it does)."""
    sample_id = line["sample_id"]
    if sample_id not in stamp.samples:
        return f"{sample_id!r} is not a sample of this run"
    if line.get("sample_sha256") != stamp.samples[sample_id]:
        return f"the content of sample {sample_id!r} changed"
    if line.get("weights_sha256") != stamp.weights_sha256:
        return "the weights changed"
    if line.get("run_sha256") != stamp.run_sha256:
        return "it was written by another configuration"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse(raw: bytes) -> dict[str, Any]:
    """One line as a record; ValueError saying what is wrong."""
    if b"\x00" in raw:
        raise ValueError("NUL bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("sample_id"), str) or not isinstance(obj.get("values"), dict):
        raise ValueError("not a sample record")
    if not isinstance(obj.get("nonfinite", {}), dict):
        raise ValueError("not a sample record")
    return obj


def read_lines(path: Path, stamp: Stamp | None = None, repair: bool = False) -> list[dict[str, Any]]:
    """The records of the samples file at ``path``, dropping what cannot be trusted.

    A last line cut short by a crash is dropped silently; damaged lines (invalid UTF-8, NUL bytes, not
    JSON, JSON that is no record) and, given ``stamp``, lines of another run are dropped with one
    warning each kind. With ``repair`` the file is rewritten (atomically) with only the kept lines,
    so the dropped samples are evaluated again.
    """
    from harness.results import atomic_write_text

    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    pieces = raw.split(b"\n")
    partial = pieces.pop() != b""  # the text after the last newline: a line cut short
    kept: list[dict[str, Any]] = []
    damaged: list[str] = []
    other: list[str] = []
    for number, piece in enumerate(pieces, start=1):
        try:
            record = _parse(piece)
        except ValueError as exc:
            damaged.append(f"line {number}: {exc}")
            continue
        reason = foreign(record, stamp) if stamp is not None else None
        if reason is not None:
            other.append(reason)
            continue
        kept.append(record)
    if damaged:
        warn(f"{path.name}: dropped {len(damaged)} damaged line(s) ({damaged[0]}); those samples are evaluated again")
    if other:
        warn(f"{path.name}: dropped {len(other)} line(s) that belong to another run ({other[0]}); those samples are evaluated again")
    if repair and (damaged or other or partial):
        atomic_write_text(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))
    return kept


def in_sample_order(lines: list[dict[str, Any]], order: dict[str, int]) -> list[dict[str, Any]]:
    """One line per sample of ``order`` (the first found), in sample order."""
    unique: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line["sample_id"] in order:
            unique.setdefault(line["sample_id"], line)
    return sorted(unique.values(), key=lambda r: order[r["sample_id"]])


def what_changed(lines: list[dict[str, Any]], stamp: Stamp) -> str:
    """What differs between the run of ``stamp`` and the run that wrote ``lines``."""
    if any("run_sha256" not in line for line in lines):
        return "written by an older harness that recorded no content digests"
    if any(line.get("weights_sha256") != stamp.weights_sha256 for line in lines):
        return "the weights changed"
    for line in lines:
        sample_id = line["sample_id"]
        if sample_id in stamp.samples and line.get("sample_sha256") != stamp.samples[sample_id]:
            return f"the content of sample {sample_id!r} changed"
    if any(line["sample_id"] not in stamp.samples for line in lines):
        return "the set of samples changed"
    return "the options, seed or component versions changed"


def explain_fresh_start(out: Path, run_id: str, stamp: Stamp) -> str | None:
    """For ``--resume`` with no samples file of ``run_id``: a line naming what changed since the
    newest earlier run of the same metric and models in ``out`` (None when there is none)."""
    prefix = run_id.rsplit("-", 1)[0]
    pattern = re.compile(re.escape(prefix) + r"-[0-9a-f]{12}\.samples\.jsonl")
    others = [p for p in Path(out).glob(f"{prefix}-*.samples.jsonl") if pattern.fullmatch(p.name)]
    for path in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)[:1]:
        lines = read_lines(path)
        if lines:
            return (f"--resume: {path.name} belongs to another run ({what_changed(lines, stamp)}); "
                    f"starting run {run_id} from the first sample")
    return None
