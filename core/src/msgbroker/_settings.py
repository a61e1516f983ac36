"""Settings: pydantic-settings models for the broker and each provider.

Sources, highest first: arguments, environment (``MSGBROKER_`` prefix, ``__`` for nesting),
a config file (JSON, TOML or YAML; the seed system's ``appsettings.json`` loads unchanged).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self
from urllib.parse import quote

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ._errors import ConfigurationError, redact

__all__ = [
    "BrokerSettings",
    "Duration",
    "KafkaSettings",
    "MemorySettings",
    "NatsSettings",
    "RabbitMQSettings",
    "RedisSettings",
    "load_settings_file",
    "parse_duration",
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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class MemorySettings(_Section):
    """The in-process provider."""

    name: str = ""
    """Brokers connected with the same name in one process share one in-memory broker."""
    claim_timeout: Duration = timedelta(seconds=10)
    """How long a member may stay silent before its partitions move to the others."""


def stackexchange_to_url(value: str) -> str:
    """Turn a StackExchange.Redis connection string (``"host:6379,password=x,ssl=true"``)
    into a redis URL; URLs pass through unchanged."""
    if "://" in value:
        return value
    parts = [p.strip() for p in value.split(",") if p.strip()]
    hosts = [p for p in parts if "=" not in p]
    options = {k.strip().lower(): v.strip() for k, v in (p.split("=", 1) for p in parts if "=" in p)}
    if not hosts:
        raise ValueError(f"no host in connection string {value!r}")
    host = hosts[0]
    if ":" not in host:
        host += ":6379"
    scheme = "rediss" if options.get("ssl", "false").lower() == "true" else "redis"
    auth = ""
    if "password" in options:
        user = quote(options.get("user", ""), safe="")
        auth = f"{user}:{quote(options['password'], safe='')}@"
    db = options.get("defaultdatabase")
    return f"{scheme}://{auth}{host}" + (f"/{db}" if db else "")


class RedisSettings(_Section):
    """Redis Streams provider."""

    url: str = "redis://localhost:6379"
    key_prefix: str = "msgbroker"
    max_stream_length: int = Field(100_000, ge=1)
    claim_timeout: Annotated[Duration, BeforeValidator(parse_duration)] = timedelta(minutes=5)
    ssl_cafile: str | None = None
    """The CA certificate bundle (PEM) that signed the server's TLS certificate, for a
    ``rediss://`` url (set with a ``redis://`` url it is an error); None trusts the system's CAs."""

    @field_validator("url", mode="before")
    @classmethod
    def _connection_string(cls, value: Any) -> Any:
        return stackexchange_to_url(value) if isinstance(value, str) else value


class NatsSettings(_Section):
    """NATS JetStream provider."""

    url: str = "nats://localhost:4222"
    stream_prefix: str = "MSGBROKER"
    max_age: Duration = timedelta(days=7)
    ack_wait: Duration = timedelta(seconds=30)
    max_deliver: int = Field(5, ge=-1)
    ssl_cafile: str | None = None
    """The CA certificate bundle (PEM) that signed the server's TLS certificate, for a ``tls://``
    url (and a ``nats://`` one to a server that requires TLS); None trusts the system's CAs."""


class RabbitMQSettings(_Section):
    """RabbitMQ provider."""

    url: str = "amqp://guest:guest@localhost:5672/"
    exchange_prefix: str = "msgbroker"
    prefetch: int = Field(1, ge=1)
    queue_type: str = "quorum"
    claim_timeout: Duration = timedelta(seconds=10)
    """How long a member may stay silent before its partitions move to the others."""
    queue_expires: Duration | None = None
    """Let the server delete a topic's and group's queues once unused this long (``x-expires``;
    for tests and short-lived topics). None (the default) keeps them until deleted by hand."""
    ssl_cafile: str | None = None
    """The CA certificate bundle (PEM) that signed the server's TLS certificate, for an
    ``amqps://`` url (set with an ``amqp://`` url it is an error); None trusts the system's CAs."""


class KafkaSettings(_Section):
    """Apache Kafka provider."""

    bootstrap_servers: str = "localhost:9092"
    client_id: str = "msgbroker"
    replication_factor: int = Field(1, ge=1)
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = Field(None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    session_timeout: Duration = timedelta(seconds=10)
    """How long a silent group member keeps its partitions (the broker allows 6 s to 5 min)."""
    heartbeat_interval: Duration = timedelta(seconds=3)
    """How often a member tells the group coordinator it is alive (under ``session_timeout``)."""
    commit_interval: Duration = timedelta(milliseconds=200)
    """How often settled offsets are committed in the background when a commit failed."""


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
        if not data:
            return {}
        if self._section is not None:
            for name in (_snake(s) for s in (self._section,)):
                if isinstance(data.get(name), Mapping):
                    return dict(data[name])
        return dict(data)


def _validation_message(cls: type[BaseModel], exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or cls.__name__
        value = err.get("input")
        if isinstance(value, dict):
            value = "{...}"  # a whole section: its other keys may hold secrets
        elif any(word in loc for word in ("password", "secret", "token")):
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


class BrokerSettings(_FileSettings):
    """Everything :func:`msgbroker.connect` needs; SPEC §5."""

    model_config = SettingsConfigDict(
        env_prefix="MSGBROKER_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )
    _section: ClassVar[str | None] = "MessageBroker"

    provider: str = "memory"
    partition_count: int = Field(64, ge=1, le=4096)
    batch_size: int = Field(100, ge=1, le=100_000)
    poll_timeout: Duration = timedelta(seconds=5)
    max_retry_attempts: int = Field(3, ge=1)
    retry_delay: Duration = timedelta(seconds=1)
    enable_deduplication: bool = False
    deduplication_window: Duration = timedelta(minutes=5)
    max_concurrency: int | None = Field(None, ge=1)
    max_message_bytes: int = Field(1024 * 1024, ge=1)
    shutdown_timeout: Duration = timedelta(seconds=30)

    memory: MemorySettings = MemorySettings()
    redis: RedisSettings = RedisSettings()
    nats: NatsSettings = NatsSettings()
    rabbitmq: RabbitMQSettings = RabbitMQSettings()
    kafka: KafkaSettings = KafkaSettings()
    provider_options: dict[str, dict[str, Any]] = {}
    """Settings of providers that have no section above (third-party plugins), keyed by the
    provider's name: ``provider_options={"sqlite": {"path": "broker.db"}}`` (docs/writing-a-provider.md)."""

    @field_validator("poll_timeout", "retry_delay", "deduplication_window", "shutdown_timeout")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        return _non_negative(value)

    @field_validator("provider")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()
