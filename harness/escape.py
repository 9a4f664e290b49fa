"""Escaping strings read from result files for each output format (CSV, Markdown, HTML)."""

from __future__ import annotations

import html
import re
from typing import Any

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`|\[\]()*~])")
_LONE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_SCRIPT_SCHEME = re.compile(r"(?i)\b(javascript|vbscript|data|file)(\s*):")


def csv_cell(value: Any) -> Any:
    """A CSV cell safe to open in a spreadsheet (OWASP CSV injection rule).

    Numbers, booleans and None are written as they are (a negative number stays a number). A string
    whose first non-blank character is ``=``, ``+``, ``-``, ``@``, tab or CR gets a leading ``'``, so
    spreadsheets show it as text instead of evaluating it as a formula.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    if text.lstrip(" ").startswith(_FORMULA_START):
        return "'" + text
    return text


def markdown_text(text: str) -> str:
    """``text`` as inert Markdown (GitHub) table-cell text.

    Newlines and other control characters become spaces (a row never splits); ``&``, ``<``, ``>``
    become entities (no raw HTML); backslashes, pipes, backticks, brackets, parentheses, ``*``, ``~``
    and word-edge ``_`` are backslash-escaped (no link, image, code span or emphasis can form); a
    ``javascript:``-like scheme has its colon written as ``&#58;`` (shown the same, never a link).
    """
    text = _CONTROL.sub(" ", str(text))
    text = html.escape(text, quote=False)
    text = _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)
    text = _LONE_UNDERSCORE.sub(r"\\_", text)
    return _SCRIPT_SCHEME.sub(r"\1\2&#58;", text)


def html_text(text: str) -> str:
    """``text`` escaped for HTML element content and attribute values."""
    return html.escape(str(text), quote=True)
