"""Class-index mapping files for ``imagefolder:PATH`` (``-o dataset.classes=FILE``).

A mapping gives each class folder its class index: a JSON object ``{"folder": index, ...}`` (a file
ending in ``.json``), a two-column CSV ``folder,index`` (``.csv``; quoted fields allowed), or text
lines ``folder index`` (any other name; the index is the last whitespace-separated field, so folder
names may contain spaces). No header line, blank lines are skipped. Everything read from the file is
untrusted: every problem (unreadable, not UTF-8, malformed, an index that is not a whole number from
0 to :data:`MAX_INDEX`, a folder named twice, two folders with the same index) is one
:class:`~harness.errors.HarnessError` line.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from harness.data import printable
from harness.errors import HarnessError

MAX_BYTES = 16 * 1024 * 1024
"""A mapping file larger than this is refused (1k ImageNet classes take about 20 kB)."""
MAX_INDEX = 999_999
"""The largest class index a mapping may give (ImageNet-21k has 21,843 classes)."""
_DIGITS = re.compile(r"[0-9]{1,7}")  # ASCII digits only: str.isdigit and int() also take other scripts' digits


def shown(text: str, limit: int = 60) -> str:
    """``text`` from an untrusted source, quoted and escaped for a one-line message, cut at ``limit``."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return repr(cut)


class _Pairs(list):
    """A JSON object as its (key, value) pairs, so duplicate keys can be seen."""


def read_mapping(spec: str) -> dict[str, int]:
    """{folder name: class index} from the mapping file ``spec`` (validated; see the module docstring)."""
    path = Path(spec).expanduser()
    where = f"class mapping {printable(str(path))}"
    text = _read_text(path, where)
    if path.suffix.lower() == ".json":
        entries = _json_entries(text, where)
    elif path.suffix.lower() == ".csv":
        entries = _csv_entries(text, where)
    else:
        entries = _text_entries(text, where)
    if not entries:
        raise HarnessError(f"imagefolder: {where} has no entries")
    mapping: dict[str, int] = {}
    owner: dict[int, str] = {}
    for name, raw, place in entries:
        if not name or "/" in name or "\x00" in name or name in (".", ".."):
            raise HarnessError(f"imagefolder: {where} {place}: {shown(name)} is no folder name")
        index = _index(raw, name, where, place, from_text=path.suffix.lower() != ".json")
        if name in mapping:
            raise HarnessError(f"imagefolder: {where} {place}: folder {shown(name)} is named twice")
        if index in owner:
            raise HarnessError(
                f"imagefolder: {where} {place}: folders {shown(owner[index])} and {shown(name)} both have index {index} "
                "(each class index may belong to one folder only)"
            )
        mapping[name], owner[index] = index, name
    return mapping


def _read_text(path: Path, where: str) -> str:
    """The file's text: a regular file, at most MAX_BYTES, UTF-8 (a BOM is allowed)."""
    try:
        if not path.exists():
            import difflib

            close = difflib.get_close_matches(str(path), ["sorted", "imagenet"], n=1, cutoff=0.7)
            hint = f"; did you mean -o dataset.classes={close[0]}?" if close else " (sorted, imagenet or a mapping FILE)"
            raise HarnessError(f"imagefolder: {where} does not exist{hint}")
        if not path.is_file():
            raise HarnessError(f"imagefolder: {where} is not a regular file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise HarnessError(f"imagefolder: cannot read {where}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_BYTES:
        raise HarnessError(f"imagefolder: {where} is larger than {MAX_BYTES // (1024 * 1024)} MB; is it the right file?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HarnessError(
            f"imagefolder: {where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _json_entries(text: str, where: str) -> list[tuple[str, Any, str]]:
    try:
        found = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as exc:
        raise HarnessError(f"imagefolder: {where} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise HarnessError(f"imagefolder: {where} is not a usable JSON file: it is nested too deeply") from None
    except ValueError:  # an integer with thousands of digits (Python's int conversion limit)
        raise HarnessError(f"imagefolder: {where} is not a usable JSON file: a number in it is too long") from None
    if not isinstance(found, _Pairs):
        raise HarnessError(f"imagefolder: {where} must hold a JSON object {{\"folder\": index, ...}}, not a {_json_kind(found)}")
    return [(name, value, f"entry {shown(name)}") for name, value in found]


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _csv_entries(text: str, where: str) -> list[tuple[str, Any, str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    entries = []
    try:
        for row in reader:
            fields = [f.strip() for f in row]
            if not any(fields):
                continue
            if len(fields) != 2:
                raise HarnessError(
                    f"imagefolder: {where} line {reader.line_num}: expected two fields FOLDER,INDEX, got {len(fields)}"
                )
            entries.append((fields[0], fields[1], f"line {reader.line_num}"))
    except csv.Error as exc:
        raise HarnessError(f"imagefolder: {where} line {reader.line_num}: not valid CSV ({exc})") from None
    return entries


def _text_entries(text: str, where: str) -> list[tuple[str, Any, str]]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(None, 1)
        if len(fields) != 2:
            raise HarnessError(f"imagefolder: {where} line {number}: expected FOLDER INDEX, got {shown(line.strip())}")
        entries.append((fields[0].strip(), fields[1], f"line {number}"))
    return entries


def _index(raw: Any, name: str, where: str, place: str, from_text: bool) -> int:
    """A class index, 0 ... MAX_INDEX: a JSON integer (JSON files) or ASCII digits (CSV and text files)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif from_text and isinstance(raw, str) and _DIGITS.fullmatch(raw):
        value = int(raw)
    else:
        value = -1
    if not 0 <= value <= MAX_INDEX:
        got = shown(raw) if from_text else ("an object" if isinstance(raw, _Pairs) else json.dumps(raw))  # JSON text is ASCII, escaped
        raise HarnessError(
            f"imagefolder: {where} {place}: the index of folder {shown(name)} must be a whole number from 0 to {MAX_INDEX}, "
            f"got {got[:60]}{' (mapping files have no header line)' if place == 'line 1' else ''}"
        )
    return value
