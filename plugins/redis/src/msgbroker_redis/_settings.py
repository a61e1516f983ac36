"""The Redis Streams provider's settings section, ``redis`` (``BrokerSettings().redis``,
``MSGBROKER_REDIS__<KEY>``, a settings file's ``Redis`` section). See docs/providers/redis.md."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote

from msgbroker.spi import Duration, ProviderSettings
from pydantic import Field, field_validator

__all__ = ["RedisSettings", "stackexchange_to_url"]


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


class RedisSettings(ProviderSettings):
    """Redis Streams provider."""

    url: str = "redis://localhost:6379"
    key_prefix: str = "msgbroker"
    max_stream_length: int = Field(100_000, ge=1)
    claim_timeout: Duration = timedelta(minutes=5)
    ssl_cafile: str | None = None
    """The CA certificate bundle (PEM) that signed the server's TLS certificate, for a
    ``rediss://`` url (set with a ``redis://`` url it is an error); None trusts the system's CAs."""

    @field_validator("url", mode="before")
    @classmethod
    def _connection_string(cls, value: Any) -> Any:
        return stackexchange_to_url(value) if isinstance(value, str) else value
