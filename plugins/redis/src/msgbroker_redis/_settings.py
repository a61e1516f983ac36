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
    into a redis URL (several hosts: the URLs comma-separated, as for a Redis Cluster's start
    nodes); URLs pass through unchanged."""
    if "://" in value:
        return value
    parts = [p.strip() for p in value.split(",") if p.strip()]
    hosts = [p for p in parts if "=" not in p]
    options = {k.strip().lower(): v.strip() for k, v in (p.split("=", 1) for p in parts if "=" in p)}
    if not hosts:
        raise ValueError(f"no host in connection string {value!r}")
    scheme = "rediss" if options.get("ssl", "false").lower() == "true" else "redis"
    auth = ""
    if "password" in options:
        user = quote(options.get("user", ""), safe="")
        auth = f"{user}:{quote(options['password'], safe='')}@"
    db = options.get("defaultdatabase")
    return ",".join(f"{scheme}://{auth}{host if ':' in host else host + ':6379'}" + (f"/{db}" if db else "")
                    for host in hosts)


class RedisSettings(ProviderSettings):
    """Redis Streams provider."""

    url: str = "redis://localhost:6379"
    """A redis URL; for a Redis Cluster one or more of its nodes, comma-separated (or a list)."""
    key_prefix: str = "msgbroker"
    """Every key the provider writes starts with ``<key_prefix>:``."""
    max_stream_length: int = Field(100_000, ge=1)
    """Settled history kept per lane stream (docs/providers/redis.md, *Trimming*)."""
    claim_timeout: Duration = timedelta(seconds=8)
    """How long a silent member keeps its membership and its lanes' leases: a member process
    that dies hands its partitions (and the message it held) to the others after this long.
    (The seed's ``ClaimTimeout``; a live member's slow handler is never claimed by idle time.)"""
    ssl_cafile: str | None = None
    """The CA certificate bundle (PEM) that signed the server's TLS certificate, for a
    ``rediss://`` url (set with a ``redis://`` url it is an error); None trusts the system's CAs."""
    cluster: bool | None = None
    """True: the url names Redis Cluster nodes (redis-py's cluster client); False: a single
    server (or a primary behind Sentinel); None: asked of the server (``INFO cluster``)."""
    wait_replicas: int = Field(0, ge=0)
    """After each publish, ack flush and group creation, ``WAIT`` until this many replicas have
    the write (0: do not wait). A publish that fewer replicas confirm within ``wait_timeout``
    fails with ``PublishIndeterminateError``."""
    wait_timeout: Duration = timedelta(seconds=1)
    """How long one ``WAIT`` waits for ``wait_replicas``."""
    max_connections: int = Field(100, ge=1, le=10_000)
    """Connections of the broker's pool (on a Redis Cluster: per node). On a single server more
    concurrent calls (``publish()`` from hundreds of tasks at once) wait for a free connection,
    up to 15 s; a Redis Cluster's client refuses a call beyond it (docs/providers/redis.md,
    *Connections*)."""

    @field_validator("url", mode="before")
    @classmethod
    def _connection_string(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v).strip() for v in value)
        return stackexchange_to_url(value) if isinstance(value, str) else value

    @field_validator("wait_timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("must be positive")
        return value
