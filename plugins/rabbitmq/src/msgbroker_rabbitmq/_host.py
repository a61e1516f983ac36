"""What a member (``_consumer``) needs from its transport, and what the transport asks of a
member, as protocols.

The member is made by the transport (``_transport``) and calls back into it; describing both
sides here lets the member module never import the transport module (no import circle inside
the distribution).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from msgbroker.spi import BrokerSettings

    from ._link import Link
    from ._names import Topology

__all__ = ["Member", "MemberHost"]


class Member(Protocol):
    """A running member of a group, as the transport sees it: the lease methods of the
    transport are delegated to the member's own connection."""

    member_id: str

    async def heartbeat(self, ttl: float) -> list[str]: ...

    async def leave(self) -> None: ...

    async def acquire(self, partition: int) -> str | None: ...

    async def renew(self, partition: int, token: str) -> bool: ...

    async def release(self, partition: int, token: str) -> None: ...

    async def stop(self, flush: bool) -> None: ...


class MemberHost(Protocol):
    """The transport as its members see it."""

    settings: BrokerSettings
    urls: list[str]
    topology: Topology
    amqp_heartbeat: int
    ssl_context: ssl.SSLContext | None

    def lease_ttl(self) -> float: ...

    def register_member(self, member: Member) -> None: ...

    def unregister_member(self, member: Member) -> None: ...

    async def ensure_topic(self, topic: str, link: Link | None = None) -> None: ...

    def run_mover(self, topic: str) -> None:
        """Move ``topic``'s due scheduled messages from this connection (when the broker picks it)."""
