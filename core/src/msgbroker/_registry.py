"""Provider discovery: built-ins first, entry points (``msgbroker.providers``) when asked for
a name that is not built in, and a table of known providers to say what to install."""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

import pluggy

from . import _hookspecs, _memory
from ._errors import ConfigurationError, ProviderNotFoundError
from ._provider import Transport
from ._settings import ProviderSettings, use_section_resolver

__all__ = ["KNOWN_PROVIDERS", "ProviderRegistry", "registry"]

ENTRY_POINT_GROUP = "msgbroker.providers"
log = logging.getLogger("msgbroker")

# scheme -> (provider name, pip extra)
KNOWN_PROVIDERS: dict[str, tuple[str, str]] = {
    "memory": ("memory", ""),
    "redis": ("redis", "redis"),
    "rediss": ("redis", "redis"),
    "nats": ("nats", "nats"),
    "tls": ("nats", "nats"),
    "amqp": ("rabbitmq", "rabbitmq"),
    "amqps": ("rabbitmq", "rabbitmq"),
    "kafka": ("kafka", "kafka"),
    "sqlite": ("sqlite", "sqlite"),
}


class ProviderRegistry:
    """Provider classes by name and by URL scheme."""

    def __init__(self) -> None:
        self.plugins = pluggy.PluginManager("msgbroker")
        self.plugins.add_hookspecs(_hookspecs)
        self.plugins.register(_memory, name="msgbroker.memory")
        self._entry_points_loaded = False
        self._broken: dict[str, str] = {}
        self._by_name: dict[str, type[Transport]] = {}
        self._collect()

    def _collect(self) -> None:
        by_name: dict[str, type[Transport]] = {}
        for result in self.plugins.hook.msgbroker_providers():
            for cls in result:
                if not (isinstance(cls, type) and issubclass(cls, Transport)):
                    raise ConfigurationError(f"msgbroker_providers returned {cls!r}, not a Transport subclass")
                other = by_name.get(cls.NAME)
                if other is not None and other is not cls:
                    raise ConfigurationError(
                        f"two providers are named {cls.NAME!r}: {other.__module__}.{other.__qualname__} "
                        f"and {cls.__module__}.{cls.__qualname__}"
                    )
                by_name[cls.NAME] = cls
        self._by_name = by_name

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object (a module or instance with ``msgbroker_providers``)."""
        self.plugins.register(plugin, name=name)
        self.plugins.check_pending()
        self._collect()

    def load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if self.plugins.has_plugin(ep.name) or self.plugins.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # one broken plugin must not hide the others
                self._broken[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
                log.warning("msgbroker provider plugin %r failed to load (%s)", ep.name, self._broken[ep.name])
                continue
            self.plugins.register(plugin, name=ep.name)
        self.plugins.check_pending()
        self._collect()

    def _broken_note(self) -> str:
        if not self._broken:
            return ""
        return "; plugins that failed to load: " + ", ".join(f"{n} ({e})" for n, e in sorted(self._broken.items()))

    def section_model(self, name: str) -> type[ProviderSettings] | None:
        """The settings model of the provider ``name`` (its ``Transport.SETTINGS``), loading
        only that provider's entry point when it is not registered yet; None when no installed
        provider of that name declares one."""
        cls = self._by_name.get(name)
        if cls is None and not self._entry_points_loaded:
            for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
                if self.plugins.has_plugin(ep.name) or self.plugins.is_blocked(ep.name):
                    continue
                try:
                    self.plugins.register(ep.load(), name=ep.name)
                except Exception as exc:  # said again, with the reason, when the provider is asked for
                    self._broken[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
                    continue
                self.plugins.check_pending()
                self._collect()
            cls = self._by_name.get(name)
        return cls.SETTINGS if cls is not None else None

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(self._by_name)

    def schemes(self) -> list[str]:
        self.load_entry_points()
        return sorted({s for cls in self._by_name.values() for s in cls.SCHEMES} | set(KNOWN_PROVIDERS))

    def by_name(self, name: str) -> type[Transport]:
        if name not in self._by_name:
            self.load_entry_points()
        cls = self._by_name.get(name)
        if cls is not None:
            return cls
        extra = next((e for n, e in KNOWN_PROVIDERS.values() if n == name and e), None)
        if extra:
            raise ProviderNotFoundError(
                f"the {name!r} provider is not installed: pip install 'msgbroker[{extra}]' "
                f"(the msgbroker-{extra} package) into {sys.prefix}" + self._broken_note()
            )
        raise ProviderNotFoundError(
            f"unknown provider {name!r}; installed providers: {', '.join(self.names())}" + self._broken_note()
        )

    def by_scheme(self, scheme: str) -> type[Transport]:
        scheme = scheme.lower()
        for cls in self._by_name.values():
            if scheme in cls.SCHEMES:
                return cls
        self.load_entry_points()
        for cls in self._by_name.values():
            if scheme in cls.SCHEMES:
                return cls
        known = KNOWN_PROVIDERS.get(scheme)
        if known is not None:
            return self.by_name(known[0])
        raise ProviderNotFoundError(
            f"unknown URL scheme {scheme + '://'!r}; known schemes: "
            + ", ".join(s + "://" for s in self.schemes())
            + self._broken_note()
        )


registry = ProviderRegistry()
use_section_resolver(registry.section_model, known={name for name, _ in KNOWN_PROVIDERS.values()} - {"memory"})
