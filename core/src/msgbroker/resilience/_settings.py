"""``ResilienceSettings``: the seed's ``Resilience`` section (docs/resilience.md)."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from .._settings import Duration, _FileSettings

__all__ = ["ResilienceSettings"]


class ResilienceSettings(_FileSettings):
    """How :class:`~msgbroker.resilience.ResilienceService` retries, breaks and times out.

    Sources, highest first: arguments, environment (``MSGBROKER_RESILIENCE__`` prefix, e.g.
    ``MSGBROKER_RESILIENCE__MAX_RETRY_ATTEMPTS=5``), the ``Resilience`` section of a config file
    (:meth:`from_file`; the seed's ``appsettings.json`` loads unchanged). Durations accept seconds,
    ``timedelta`` and .NET TimeSpan strings (``"00:00:30"``). A bad value raises
    :class:`~msgbroker.ConfigurationError` naming the key and the value.
    """

    model_config = SettingsConfigDict(
        env_prefix="MSGBROKER_RESILIENCE__",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        frozen=True,
    )
    _section: ClassVar[str | None] = "Resilience"

    max_retry_attempts: int = Field(default=3, ge=0, le=1000)
    """Retries after the first attempt (Polly's ``MaxRetryAttempts``): 3 means up to 4 attempts."""
    retry_delay: Duration = timedelta(seconds=1)
    """The delay before the first retry; the base of the exponential backoff."""
    max_retry_delay: Duration = timedelta(seconds=30)
    """No retry waits longer than this, jitter included."""
    use_exponential_backoff: bool = True
    """Double the delay on each retry (``retry_delay * 2**(n-1)``); off: always ``retry_delay``."""
    jitter_factor: float = Field(default=0.2, ge=0.0, le=1.0)
    """Each delay is multiplied by a random factor in ``[1 - jitter_factor, 1 + jitter_factor]``."""
    enable_circuit_breaker: bool = True
    """Whether calls go through the circuit breaker."""
    circuit_breaker_failure_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    """The breaker opens when this share of the sampled calls failed."""
    circuit_breaker_duration: Duration = timedelta(seconds=30)
    """How long the breaker stays open before it lets one trial call through."""
    circuit_breaker_sampling_duration: Duration = timedelta(seconds=60)
    """The rolling window over which the failure ratio is measured."""
    circuit_breaker_minimum_throughput: int = Field(default=10, ge=1)
    """The breaker never opens while the window holds fewer calls than this."""
    timeout: Duration = timedelta(seconds=30)
    """The longest one attempt may run; it then fails with ``TimeoutError`` (transient)."""

    @field_validator("retry_delay", "max_retry_delay")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must not be negative")
        return value

    @field_validator("circuit_breaker_duration", "circuit_breaker_sampling_duration", "timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be positive")
        return value

    @field_validator("max_retry_delay")
    @classmethod
    def _not_below_retry_delay(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        retry_delay = info.data.get("retry_delay")
        if retry_delay is not None and value < retry_delay:
            raise ValueError(f"must not be shorter than retry_delay ({retry_delay.total_seconds()}s)")
        return value
