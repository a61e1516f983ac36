"""Settings: pydantic-settings models for the broker and each provider.

Sources, highest first: arguments, environment (``MSGBROKER_`` prefix, ``__`` for nesting),
a config file (JSON, TOML or YAML; the seed system's ``appsettings.json`` loads unchanged).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ._errors import ConfigurationError, redact

__all__ = [
    "BrokerSettings",
    "Duration",
    "MemorySettings",
    "ProviderSettings",
    "load_settings_file",
    "parse_duration",
    "use_section_resolver",
]

_TIMESPAN = re.compile(
    r"^(?P<sign>-)?(?:(?P<days>\d+)\.)?(?P<hours>\d{1,2}):(?P<minutes>\d{1,2})"
    r"(?::(?P<seconds>\d{1,2})(?:\.(?P<fraction>\d{1,7}))?)?$"
)
_SUFFIXED = re.compile(r"^(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> Any:
    """Accept seconds (int/float), .NET TimeSpan strings (``"00:00:05"``, ``"7.00:00:00"``),
    suffixed strings (``"500ms"``, ``"5s"``, ``"2m"``), ISO 8601 and ``timedelta``.

    Anything else is passed on for pydantic to reject with the key and the value.
    """
    if isinstance(value, str):
        text = value.strip()
        match = _TIMESPAN.match(text)
        if match:
            fraction = match["fraction"] or "0"
            delta = timedelta(
                days=int(match["days"] or 0),
                hours=int(match["hours"]),
                minutes=int(match["minutes"]),
                seconds=int(match["seconds"] or 0),
                microseconds=int(fraction.ljust(7, "0")) / 10,
            )
            return -delta if match["sign"] else delta
        match = _SUFFIXED.match(text)
        if match:
            return timedelta(seconds=float(match["value"]) * _UNITS[match["unit"]])
        try:
            return timedelta(seconds=float(text))
        except ValueError:
            return value
    return value


def _non_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError("must not be negative")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
"""A ``timedelta`` that also accepts seconds and .NET TimeSpan strings."""


class ProviderSettings(BaseModel):
    """The base of a provider's own settings section (``Transport.SETTINGS``): frozen, unknown
    keys refused. ``BrokerSettings`` validates the section named like the provider against it,
    wherever it comes from (arguments, ``MSGBROKER_<NAME>__<KEY>`` variables, a settings file)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


_Section = ProviderSettings
S = TypeVar("S", bound=ProviderSettings)

SectionResolver = Callable[[str], "type[ProviderSettings] | None"]
_resolver: list[SectionResolver] = []
_known_providers: set[str] = set()


def use_section_resolver(resolver: SectionResolver, known: Iterable[str] = ()) -> None:
    """Where ``BrokerSettings`` finds the settings model of a section it does not declare
    itself: the provider registry installs its lookup here (by provider name), with the names of
    the providers it knows of even when they are not installed (``known``)."""
    _resolver[:] = [resolver]
    _known_providers.update(known)


def _section_model(name: str) -> type[ProviderSettings] | None:
    return _resolver[0](name) if _resolver else None


def _is_provider_section(name: str) -> bool:
    """A section of an installed provider, or of a known one that is not installed here (not
    ``Logging``, ``Resilience`` or another part of an application's settings file)."""
    return name in _known_providers or _section_model(name) is not None


class MemorySettings(_Section):
    """The in-process provider."""

    name: str = ""
    """Brokers connected with the same name in one process share one in-memory broker."""
    claim_timeout: Duration = timedelta(seconds=8)
    """How long a member may stay silent before its partitions move to the others."""


# Keys of the seed's appsettings.json that are not the snake_case of our field names.
_ALIASES: dict[str, str] = {"connection_string": "url"}
_SECTION_NAMES = ("MessageBroker", "messagebroker", "message_broker", "msgbroker")
_file_data: ContextVar[Mapping[str, Any] | None] = ContextVar("_file_data", default=None)


def _snake(key: str) -> str:
    if "_" in key or key.islower():
        return key.lower()
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", key).lower()


def _normalise(data: Any) -> Any:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = _snake(str(key))
            out[_ALIASES.get(name, name)] = _normalise(value)
        return out
    if isinstance(data, list):
        return [_normalise(v) for v in data]
    return data


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON, TOML or YAML file into a dict with snake_case keys."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigurationError(f"cannot read settings file {str(file)!r}: {exc.strerror}") from exc
    suffix = file.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml  # type: ignore[import-untyped]

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ConfigurationError(f"settings file {str(file)!r} is not valid {suffix or 'JSON'}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"settings file {str(file)!r} must hold a mapping at the top")
    normalised: dict[str, Any] = _normalise(data)
    return normalised


class _FileSource(PydanticBaseSettingsSource):
    """The lowest-priority source: the file given to ``from_file``."""

    def __init__(self, settings_cls: type[BaseSettings], section: str | None) -> None:
        super().__init__(settings_cls)
        self._section = section

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ is used instead

    def __call__(self) -> dict[str, Any]:
        data = _file_data.get()
        return _file_section(data, self._section) if data else {}


def _file_section(data: Mapping[str, Any], section: str | None) -> dict[str, Any]:
    """The part of a settings file a class reads: its section (``MessageBroker``) when the file
    has one, else the whole file."""
    if section is not None and isinstance(data.get(_snake(section)), Mapping):
        return dict(data[_snake(section)])
    return dict(data)


def _validation_message(cls: type[BaseModel], exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (*((prefix,) if prefix else ()), *err["loc"])) or cls.__name__
        value = err.get("input")
        if isinstance(value, dict):
            value = "{...}"  # a whole section: its other keys may hold secrets
        elif any(word in loc for word in ("password", "secret", "token", "seed")):
            value = "***"
        lines.append(redact(f"{loc}={value!r}: {err['msg']}"))
    return f"invalid {cls.__name__}: " + "; ".join(lines)


class _FileSettings(BaseSettings):
    """Shared source order and file loading for the top-level settings classes."""

    _section: ClassVar[str | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls, cls._section))

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_validation_message(type(self), exc)) from exc

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Self:
        """Load from a JSON/TOML/YAML file; environment and ``overrides`` take precedence."""
        with _reading(load_settings_file(path)):
            return cls(**overrides)


@contextmanager
def _reading(data: Mapping[str, Any]) -> Iterator[None]:
    token = _file_data.set(data)
    try:
        yield
    finally:
        _file_data.reset(token)


class _SectionEnvSource(PydanticBaseSettingsSource):
    """``MSGBROKER_<NAME>__<KEY>`` variables of sections ``BrokerSettings`` does not declare
    (each provider's own), nested at every further ``__``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ is used instead

    def __call__(self) -> dict[str, Any]:
        declared = set(self.settings_cls.model_fields)
        out: dict[str, Any] = {}
        for key, value in os.environ.items():
            upper = key.upper()
            if not upper.startswith("MSGBROKER_") or "__" not in upper:
                continue
            path = [part.lower() for part in key[len("MSGBROKER_"):].split("__")]
            if path[0] in declared or not all(path):
                continue
            node = out
            for part in path[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    break
                node = child
            else:
                text = value.strip()
                if text[:1] in "[{":
                    try:
                        node[path[-1]] = json.loads(text)
                        continue
                    except ValueError:
                        pass
                node[path[-1]] = value
        return out


class BrokerSettings(_FileSettings):
    """Everything :func:`msgbroker.connect` needs (docs/semantics.md, *Settings*).

    Besides the fields below, one section per installed provider, named like the provider
    (``redis``, ``nats``, ...), validated against the model the provider declares
    (``Transport.SETTINGS``) and read as ``settings.redis`` or, typed,
    ``settings.section(RedisSettings)``. A section of a provider that is not installed is kept
    as given and says what to install when it is read."""

    model_config = SettingsConfigDict(
        env_prefix="MSGBROKER_", env_nested_delimiter="__", extra="allow", validate_default=True
    )
    _section: ClassVar[str | None] = "MessageBroker"
    _unclaimed: set[str] = PrivateAttr(default_factory=set)
    _file_sections: tuple[str, ...] = PrivateAttr(default=())
    """The provider sections (``redis``, ``nats``, ...) the settings file configured."""
    _file_name: str | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _SectionEnvSource(settings_cls), _FileSource(settings_cls, cls._section))

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        data = _file_data.get()
        if data:
            declared = type(self).model_fields
            self._file_sections = tuple(sorted(
                name for name, value in _file_section(data, self._section).items()
                if isinstance(value, Mapping) and name not in declared and _is_provider_section(name)
            ))
        extra = self.__pydantic_extra__
        if extra is None:
            return
        for name, value in list(extra.items()):
            model = _section_model(name)
            if model is not None:
                if not isinstance(value, model):
                    try:
                        extra[name] = model.model_validate(value if value is not None else {})
                    except ValidationError as exc:
                        raise ConfigurationError(_validation_message(type(self), exc, name)) from exc
            elif isinstance(value, Mapping):
                self._unclaimed.add(name)  # a provider that is not installed here
            else:
                raise ConfigurationError(f"invalid BrokerSettings: unknown setting {name}={redact(repr(value))}")

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            extra = self.__pydantic_extra__
            if extra is not None and name in extra and name not in self._unclaimed:
                return extra[name]
            if name in self._unclaimed:
                raise ConfigurationError(
                    f"the settings section {name!r} belongs to a provider that is not installed "
                    f"(pip install msgbroker-{name}, or the distribution that provides {name!r})"
                )
            model = _section_model(name)
            if model is not None:
                section = model()
                if extra is not None:
                    extra[name] = section
                return section
        return super().__getattr__(name)  # type: ignore[misc]

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Self:
        """Load from a JSON/TOML/YAML file; environment and ``overrides`` take precedence.

        A file that configures providers (``Redis``, ``Nats``, ... sections) must also say which
        one to use (``Provider``, ``MSGBROKER_PROVIDER`` or ``provider=...``) before it is
        connected: :func:`msgbroker.connect` refuses to fall back to the in-memory broker then
        (:meth:`check_provider_chosen`). Loading it never fails for that."""
        settings = super().from_file(path, **overrides)
        settings._file_name = str(path)
        return settings

    def check_provider_chosen(self) -> None:
        """Raise :class:`ConfigurationError` when a settings file configured provider sections but
        nothing named the provider: the default, the in-process memory broker, is surely not
        what such a file means (``connect()`` calls this)."""
        if "provider" in self.model_fields_set or not self._file_sections:
            return
        found = self._file_sections
        first = found[0]
        names = " and ".join(", ".join(found).rsplit(", ", 1))
        plural = "s" if len(found) > 1 else ""
        raise ConfigurationError(
            f"the settings file {self._file_name!r} configures {names} (section{plural} "
            f"{', '.join(repr(s) for s in found)}) but names no provider, and msgbroker will not fall back "
            f"to the in-process memory broker for it: choose one with \"Provider\": \"{first}\" in the file's "
            f"{self._section} section, MSGBROKER_PROVIDER={first}, provider=\"{first}\" in Python, or the "
            f"broker's --url on the command line (\"Provider\": \"memory\" keeps the in-process broker)"
        )

    def section(self, model: type[S]) -> S:
        """This provider's section, typed: ``settings.section(RedisSettings)``."""
        extra = self.__pydantic_extra__ or {}
        for value in extra.values():
            if type(value) is model:
                return value
        for name, field in type(self).model_fields.items():
            if field.annotation is model:
                return getattr(self, name)  # type: ignore[no-any-return]
        return model()

    def sections(self) -> dict[str, Any]:
        """Every provider section given or read so far, by name (unclaimed ones as given)."""
        return dict(self.__pydantic_extra__ or {})

    provider: str = "memory"
    """The provider by name (``redis``, ``nats``, ``rabbitmq``, ``kafka``, ``sqlite``, ``memory``); a
    URL's scheme sets it. A settings file with provider sections must name it (docs/providers/memory.md)."""
    partition_count: int = Field(64, ge=1, le=4096)
    """Partitions per topic: a key's partition is ``murmur2(key) % partition_count``, so every producer
    and worker of a topic must use the same count."""
    batch_size: int = Field(100, ge=1, le=100_000)
    """Deliveries the engine reads ahead and buffers per lane (one poll reads up to this many)."""
    poll_timeout: Duration = timedelta(seconds=5)
    """The longest one poll waits for messages (a provider may cap it shorter)."""
    max_retry_attempts: int = Field(3, ge=1)
    """Failed deliveries (a raise, a nak, a worker that died holding it) before a message is dead-lettered."""
    retry_delay: Duration = timedelta(seconds=1)
    """How long a naked message waits before it is delivered again (it keeps the head of its lane)."""
    enable_deduplication: bool = False
    """Drop a publish whose message id was published within ``deduplication_window`` (providers
    that cannot refuse it with ``CapabilityNotSupported``)."""
    deduplication_window: Duration = timedelta(minutes=5)
    """How long a published message id is remembered for deduplication."""
    max_concurrency: int | None = Field(None, ge=1)
    """Handlers running at once per subscription: an unordered one runs up to this many (unset: 100),
    an ordered one one per lane and at most this many lanes at a time (unset: no limit). The
    subscription's own ``max_concurrency`` wins."""
    max_message_bytes: int = Field(1024 * 1024, ge=1)
    """The largest encoded message a publish accepts (the provider's own limit applies too)."""
    shutdown_timeout: Duration = timedelta(seconds=30)
    """How long closing waits for handlers in flight; one still running then is cancelled and its
    message stays unsettled for redelivery."""

    memory: MemorySettings = MemorySettings()
    """The in-process provider's section."""

    @field_validator("poll_timeout", "retry_delay", "deduplication_window", "shutdown_timeout")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        return _non_negative(value)

    @field_validator("provider")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()
