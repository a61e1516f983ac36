"""What a resilient call is about, for logs and events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ResilienceContext"]


@dataclass(frozen=True, slots=True)
class ResilienceContext:
    """Names the operation a resilient call performs (the seed's ``ResilienceContext``).

    It changes nothing about how the call is retried or broken; it is carried into every log
    line and event so that an operator can tell which message or call was retried.
    """

    operation_name: str = "operation"
    """What the call does, e.g. ``"CallExternalService"`` or ``"handle seat-lock-requests"``."""
    message_id: str | None = None
    """The message being handled, when there is one."""
    topic: str | None = None
    """The topic of that message, when there is one."""
    properties: Mapping[str, Any] = field(default_factory=dict)
    """Anything else worth logging with the call."""

    def describe(self) -> str:
        """A short description for log lines: ``"operation (message 123 on my-topic)"``."""
        details = []
        if self.message_id is not None:
            details.append(f"message {self.message_id}")
        if self.topic is not None:
            details.append(f"on {self.topic}")
        return f"{self.operation_name} ({' '.join(details)})" if details else self.operation_name
