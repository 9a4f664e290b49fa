"""Plugin discovery through the ``harness`` entry-point group, with per-plugin error isolation.

A plugin is third-party code run at import and registration: anything it raises there (any
``BaseException`` but ``KeyboardInterrupt``, so ``sys.exit()``, ``SystemExit`` and ``GeneratorExit``
too) is recorded on the plugin, which is skipped; the other plugins and every command keep working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy

from harness import hookspecs

ENTRY_POINT_GROUP = "harness"
BUNDLED_DIST = "harness"
HOOK_KINDS = {
    "register_models": "model",
    "register_attributors": "attributor",
    "register_maskers": "masker",
    "register_metrics": "metric",
    "register_datasets": "dataset",
}


@dataclass
class PluginInfo:
    """One entry point of the ``harness`` group: where it comes from, what it gave, what failed."""

    name: str
    module: str
    dist: str | None
    version: str | None
    components: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    enabled: bool = True
    skipped: str | None = None
    """Why an optional plugin is not loaded (its library is missing), with the install command."""

    @property
    def bundled(self) -> bool:
        """Whether the plugin ships with harness itself."""
        return self.dist == BUNDLED_DIST

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.dist,
            "version": self.version,
            "bundled": self.bundled,
            "enabled": self.enabled,
            "components": self.components,
            "errors": self.errors,
            "skipped": self.skipped,
        }


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` (or ``Type`` alone) on one line, safe even when ``str(exc)`` itself raises."""
    name = type(exc).__name__
    try:
        text = " ".join(str(exc).split())
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - a hostile __str__ must not escape either
        text = "<unprintable>"
    return f"{name}: {text}" if text else name


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return {part.strip() for part in raw.split(",") if part.strip()} or None


def _selected(info: PluginInfo, only: set[str] | None, disabled: set[str] | None) -> bool:
    names = {info.name, info.module, info.dist or ""}
    if only is not None and not names & only:
        return False
    return not (disabled and names & disabled)


def discover(entry_points: Iterable[metadata.EntryPoint] | None = None) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """Load every plugin of the group; a plugin that fails to import is recorded and skipped.

    ``HARNESS_PLUGINS`` (comma list of entry-point, module or distribution names) keeps only those;
    ``HARNESS_DISABLE_PLUGINS`` drops those. Bundled plugins load first, then the rest by name.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    eps = list(entry_points if entry_points is not None else metadata.entry_points(group=ENTRY_POINT_GROUP))
    infos: list[PluginInfo] = []
    for ep in eps:
        dist = getattr(ep, "dist", None)
        infos.append(
            PluginInfo(
                name=ep.name,
                module=ep.value,
                dist=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
            )
        )
    order = sorted(range(len(eps)), key=lambda i: (not infos[i].bundled, infos[i].dist or "", infos[i].name))
    only, disabled = _env_list("HARNESS_PLUGINS"), _env_list("HARNESS_DISABLE_PLUGINS")
    loaded: list[PluginInfo] = []
    seen: set[str] = set()
    for i in order:
        info, ep = infos[i], eps[i]
        if (info.dist, info.name) in seen:
            continue  # the same distribution visible twice on sys.path
        seen.add((info.dist, info.name))  # type: ignore[arg-type]
        info.enabled = _selected(info, only, disabled)
        loaded.append(info)
        if not info.enabled:
            continue
        try:
            plugin = ep.load()
        except KeyboardInterrupt:
            raise
        except ImportError as exc:
            if isinstance(getattr(exc, "install", None), str):  # an optional extra that is not installed
                info.skipped = describe_exception(exc)
            else:
                info.errors.append(f"import failed: {describe_exception(exc)}")
            continue
        except BaseException as exc:  # noqa: BLE001 - a broken plugin (even sys.exit()) must not break the rest
            info.errors.append(f"import failed: {describe_exception(exc)}")
            continue
        key = f"{info.dist}:{info.name}"
        try:
            pm.register(plugin, name=key)
            pm.check_pending()  # a misspelt hook name (e.g. register_model) is an error, not silence
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            if pm.get_plugin(key) is not None:
                pm.unregister(name=key)
            info.errors.append(f"registration failed: {describe_exception(exc)}")
    return pm, loaded


def call_registrations(
    pm: pluggy.PluginManager,
    infos: list[PluginInfo],
    accept: Callable[[str, Any, PluginInfo], None],
) -> None:
    """Call every plugin's registration hooks and pass each component to ``accept(kind, obj, info)``.

    Plugins are handled one at a time: if any of a plugin's hooks raises (any ``BaseException`` but
    ``KeyboardInterrupt``), the error is recorded on the plugin and none of its components is
    accepted (the plugin is skipped, the rest works). If ``accept`` itself raises on a component (a
    hostile object), that component is recorded as failed and the plugin's others are still offered.
    """
    by_name = {f"{i.dist}:{i.name}": i for i in infos}
    collected: dict[str, list[tuple[str, Any]]] = {}
    for hook_name, kind in HOOK_KINDS.items():
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # registration order
            info = by_name[impl.plugin_name]
            if info.errors:
                continue
            found: list[Any] = []
            try:
                impl.function(**{arg: found.append for arg in impl.argnames})
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - isolate the failing plugin, SystemExit included
                info.errors.append(f"{hook_name} failed: {describe_exception(exc)}")
                continue
            collected.setdefault(impl.plugin_name, []).extend((kind, obj) for obj in found)
    for info in infos:
        key = f"{info.dist}:{info.name}"
        if info.errors or key not in collected:
            continue
        for kind, obj in collected[key]:
            try:
                accept(kind, obj, info)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - e.g. an ``id`` property that calls sys.exit()
                info.errors.append(f"{kind} registration failed: {describe_exception(exc)}")


def disabled_bundled_ids(infos: list[PluginInfo]) -> dict[str, dict[str, str]]:
    """``kind -> id -> provider`` of what the bundled plugins switched off by the selection would register.

    Their ids stay reserved: a third-party plugin cannot take over ``accuracy`` by disabling the bundled
    one. Bundled plugins ship with harness, so loading them here runs no third-party code; one that
    fails to load reserves nothing.
    """
    reserved: dict[str, dict[str, str]] = {kind: {} for kind in HOOK_KINDS.values()}
    for info in infos:
        if info.enabled or not info.bundled:
            continue
        provider = f"{info.dist}:{info.name} (disabled)"
        pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        pm.add_hookspecs(hookspecs)
        try:
            plugin = metadata.EntryPoint(name=info.name, value=info.module, group=ENTRY_POINT_GROUP).load()
            pm.register(plugin, name=info.name)
            for hook_name, kind in HOOK_KINDS.items():
                for impl in getattr(pm.hook, hook_name).get_hookimpls():
                    found: list[Any] = []
                    impl.function(**{arg: found.append for arg in impl.argnames})
                    for obj in found:
                        cid = getattr(obj, "id", None)
                        if isinstance(cid, str) and cid:
                            reserved[kind].setdefault(cid, provider)
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - it reserves what it registered before failing
            continue
    return reserved
