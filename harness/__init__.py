"""harness: a plugin-based evaluation harness for how vision models decide.

Plugins implement the hooks in :mod:`harness.hookspecs` and mark them with :data:`hookimpl`.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "harness"
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for plugin hook implementations: ``@harness.hookimpl``."""

__all__ = ["__version__", "hookimpl", "PROJECT_NAME"]
