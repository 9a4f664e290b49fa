"""The hook specifications plugins implement, one registration hook per component kind.

Each hook receives a ``register`` callable; a plugin calls it once per component::

    @harness.hookimpl
    def register_metrics(register):
        register(MyMetric)
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("harness")


@hookspec
def register_models(register: Callable) -> None:
    """Register model specs (:class:`harness.components.ModelSpec`)."""


@hookspec
def register_attributors(register: Callable) -> None:
    """Register attributor classes (subclasses of :class:`harness.components.Attributor`)."""


@hookspec
def register_maskers(register: Callable) -> None:
    """Register masker classes (subclasses of :class:`harness.components.Masker`)."""


@hookspec
def register_metrics(register: Callable) -> None:
    """Register metric classes (subclasses of :class:`harness.components.Metric`)."""


@hookspec
def register_datasets(register: Callable) -> None:
    """Register dataset classes (subclasses of :class:`harness.components.Dataset`)."""
