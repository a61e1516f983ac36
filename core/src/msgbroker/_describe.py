"""The read model of one group on one topic (``Transport.describe``): what an operator sees on
the dashboard (docs/dashboard.md) — per partition its pending count, owner, the message at its
head and how old the oldest unsettled message is; the members and what each holds.

The default, ``msgbroker.spi.describe_from_interface`` (in ``_provider.py``), builds it from
what every provider already offers (``pending_count``, the optional ``pending_by_partition``
and ``peek``, ``dead_letters``), so a third-party provider gets it without writing anything; a
provider that can read owners, members and ages from the broker's own state overrides
``Transport.describe`` (starting from that one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["GroupView", "MemberView", "PartitionView"]


@dataclass(frozen=True, slots=True)
class PartitionView:
    """One lane of the group: (topic, group, ``partition``)."""

    partition: int
    pending: int | None
    """Messages of the partition the group has not settled (docs/semantics.md, rule 7); None
    when the provider does not count per partition."""
    owner: str | None = None
    """The member holding the lane (its lease, or the broker's assignment); None: nobody, or the
    provider cannot tell (``GroupView.owners_known``)."""
    head: str | None = None
    """The message id of the lane's oldest unsettled message: in flight when an owner holds the
    lane (an ordered lane hands nothing after it before it is settled)."""
    attempt: int | None = None
    """Deliveries of ``head`` so far (0: not delivered yet)."""
    oldest_age: float | None = None
    """Seconds since the oldest unsettled message was published, where known."""
    published: int | None = None
    """Messages ever appended to the partition, where the broker counts them (rates)."""


@dataclass(frozen=True, slots=True)
class MemberView:
    """One live member of the group."""

    member_id: str
    joined_at: datetime | None
    """When it joined (first heartbeat), where the broker records it."""
    partitions: tuple[int, ...] = ()
    """The partitions it holds now."""


@dataclass(frozen=True, slots=True)
class GroupView:
    """The group ``group`` on ``topic``, as the provider sees it now."""

    topic: str
    group: str
    pending: int
    """``pending_count``: the group's unsettled messages over all partitions."""
    partitions: tuple[PartitionView, ...]
    """Every partition, 0 to ``partition_count - 1``."""
    dead_letters: int
    members: tuple[MemberView, ...] | None = None
    """The live members; None when the provider cannot list them."""
    owners_known: bool = False
    """True when ``PartitionView.owner`` is the broker's word (None there then means nobody)."""
    notes: tuple[str, ...] = field(default=())
    """What the provider could not tell, in words (shown on the dashboard)."""

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the dashboard's API)."""
        return {
            "topic": self.topic,
            "group": self.group,
            "pending": self.pending,
            "dead_letters": self.dead_letters,
            "owners_known": self.owners_known,
            "notes": list(self.notes),
            "partitions": [
                {"partition": p.partition, "pending": p.pending, "owner": p.owner, "head": p.head,
                 "attempt": p.attempt, "oldest_age": p.oldest_age, "published": p.published}
                for p in self.partitions
            ],
            "members": None if self.members is None else [
                {"member_id": m.member_id, "joined_at": None if m.joined_at is None else m.joined_at.isoformat(),
                 "partitions": list(m.partitions)}
                for m in self.members
            ],
        }
