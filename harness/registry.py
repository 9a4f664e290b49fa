"""Everything installed plugins registered, plus registry.toml's model aliases and suites."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from harness.components import COMPONENT_KINDS, Component, ModelSpec
from harness.errors import HarnessError, UnknownIdError
from harness.plugins import PluginInfo, call_registrations, disabled_bundled_ids, discover

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Registered:
    """A component and the plugin that provided it."""

    obj: Any
    provider: str


@dataclass(frozen=True)
class Alias:
    """A registry.toml model alias: a short name for a timm id (with kwargs) or a registered model."""

    id: str
    timm: str | None = None
    model: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class Registry:
    """Components by kind and id, with aliases, suites and the plugins they came from."""

    plugins: list[PluginInfo]
    components: dict[str, dict[str, Registered]]
    aliases: dict[str, Alias]
    suites: dict[str, dict[str, Any]]

    # -- lookup -----------------------------------------------------------------------------
    def ids(self, kind: str) -> list[str]:
        """Registered ids of ``kind`` (for models: registered ids and aliases)."""
        ids = set(self.components[kind])
        if kind == "model":
            ids |= set(self.aliases)
        return sorted(ids)

    def get(self, kind: str, id: str) -> Any:
        """The component class (or ModelSpec) registered as ``id``; unknown ids raise with close matches."""
        if kind == "model":
            return self.model_spec(id)
        try:
            return self.components[kind][id].obj
        except KeyError:
            raise UnknownIdError(kind, id, self.ids(kind)) from None

    def provider(self, kind: str, id: str) -> str:
        """The plugin that registered ``id``."""
        entry = self.components[kind].get(id)
        return entry.provider if entry else ("registry.toml" if id in self.aliases else "timm")

    def model_spec(self, id: str) -> ModelSpec:
        """Resolve a model id: registered models, then registry.toml aliases, then any timm model."""
        if id in self.components["model"]:
            return self.components["model"][id].obj
        if id in self.aliases:
            return self._alias_spec(self.aliases[id])
        if _timm_knows(id):
            return timm_model_spec(id)
        import timm

        raise UnknownIdError("model", id, [*self.ids("model"), *timm.list_models()])

    def _alias_spec(self, alias: Alias) -> ModelSpec:
        if alias.model is not None:
            target = self.model_spec(alias.model)
            return ModelSpec(
                id=alias.id,
                build=target.build,
                description=alias.description or target.description,
                weights=target.weights,
                data_config=target.data_config,
                version=target.version,
                provider="registry.toml",
            )
        assert alias.timm is not None
        spec = timm_model_spec(alias.timm, **alias.kwargs)
        return ModelSpec(
            id=alias.id,
            build=spec.build,
            description=alias.description or spec.description,
            weights=spec.weights,
            provider="registry.toml",
        )

    def suite(self, name: str) -> dict[str, Any]:
        """The suite table of registry.toml named ``name``."""
        try:
            return self.suites[name]
        except KeyError:
            raise UnknownIdError("suite", name, self.suites) from None


def timm_model_spec(name: str, **kwargs: Any) -> ModelSpec:
    """A ModelSpec for any timm model id (``arch`` or ``arch.tag``), weights from timm's hub."""
    from harness.hub import create_timm_model

    extra = f" {kwargs}" if kwargs else ""
    return ModelSpec(
        id=name,
        build=lambda pretrained: create_timm_model(name, pretrained, **kwargs),
        description=f"timm {name}{extra}",
        weights=f"timm:{name}",
        provider="timm",
    )


def _timm_knows(id: str) -> bool:
    import timm

    if id.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return True
    try:
        arch, _, tag = id.partition(".")
        if not timm.is_model(arch):
            return False
        return not tag or id in timm.list_pretrained(f"{arch}.*")
    except Exception:
        return False


# -- building ------------------------------------------------------------------------------------
def read_registry_toml(text: str, source: str) -> tuple[dict[str, Alias], dict[str, dict[str, Any]]]:
    """Parse registry.toml text into aliases and suites."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HarnessError(f"{source}: {exc}") from None
    aliases = {}
    for alias_id, table in data.get("models", {}).items():
        if ("timm" in table) == ("model" in table):
            raise HarnessError(f"{source}: model alias {alias_id!r} needs exactly one of 'timm' or 'model'")
        aliases[alias_id] = Alias(
            id=alias_id,
            timm=table.get("timm"),
            model=table.get("model"),
            kwargs=dict(table.get("kwargs", {})),
            description=table.get("description", ""),
        )
    return aliases, dict(data.get("suites", {}))


Holder = Callable[[str, str], "str | None"]
"""``holder(kind, id)``: who already holds an id outside the plugins' registrations (or None)."""


def reserved_ids(aliases: dict[str, Alias], infos: list[PluginInfo]) -> Holder:
    """Ids no plugin may take: registry.toml's model aliases and the ids of switched-off bundled plugins.

    The bundled plugins' ids are looked up only when first needed (a run with no plugin disabled
    loads nothing extra).
    """
    bundled: dict[str, dict[str, str]] | None = None

    def holder(kind: str, cid: str) -> str | None:
        nonlocal bundled
        if kind == "model" and cid in aliases:
            alias = aliases[cid]
            target = f"timm:{alias.timm}" if alias.timm is not None else f"model {alias.model}"
            return f"registry.toml (alias for {target})"
        if bundled is None:
            bundled = disabled_bundled_ids(infos)
        return bundled.get(kind, {}).get(cid)

    return holder


def _accept_into(components: dict[str, dict[str, Registered]], infos: list[PluginInfo], reserved: Holder | None = None):
    def accept(kind: str, obj: Any, info: PluginInfo) -> None:
        provider = f"{info.dist or '?'}:{info.name}"
        cid = getattr(obj, "id", None)
        valid = isinstance(obj, ModelSpec) if kind == "model" else (
            isinstance(obj, type) and issubclass(obj, Component) and obj.kind == kind
        )
        if not valid or not isinstance(cid, str) or not cid:
            info.errors.append(f"registered an invalid {kind}: {obj!r}")
            return
        if cid in components[kind]:
            other: str | None = components[kind][cid].provider
        else:
            other = reserved(kind, cid) if reserved is not None else None
        if other is not None:  # taken ids are never taken over: aliases, bundled ids, earlier plugins
            info.errors.append(f"duplicate {kind} id {cid!r}: already provided by {other}; ignored from {provider}")
            return
        components[kind][cid] = Registered(obj, provider)
        info.components.setdefault(kind + "s", []).append(cid)

    return accept


def build_registry() -> Registry:
    """Discover plugins, collect their components and read registry.toml."""
    text = resources.files("harness").joinpath("registry.toml").read_text(encoding="utf-8")
    aliases, suites = read_registry_toml(text, "registry.toml")
    pm, infos = discover()
    components: dict[str, dict[str, Registered]] = {kind: {} for kind in COMPONENT_KINDS}
    call_registrations(pm, infos, _accept_into(components, infos, reserved_ids(aliases, infos)))
    from harness.progress import warn

    for info in infos:
        for error in info.errors:
            warn(f"plugin {info.name} ({info.dist}): {error}")
    return Registry(plugins=infos, components=components, aliases=aliases, suites=suites)


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (built once)."""
    return build_registry()


def registry_path() -> Path:
    """Where the packaged registry.toml lives."""
    return Path(str(resources.files("harness").joinpath("registry.toml")))
