"""Names and arguments of everything the provider declares on the RabbitMQ server.

Topic and group names are ``A-Z a-z 0-9 _ . -``, so ``:`` separates the parts of a name and
``@`` marks the provider's own objects: no topic or group can make two names collide.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["DELIVERY_LIMIT", "MAX_EXCHANGE_BYTES", "MAX_NAME_BYTES", "Topology"]

MAX_NAME_BYTES = 255
"""AMQP 0-9-1 short strings (queue names, routing keys) hold 255 bytes."""
MAX_EXCHANGE_BYTES = 127
"""pamqp (aio-pika's codec) refuses exchange names longer than 127 characters."""

DELIVERY_LIMIT = 1000
"""``x-delivery-limit`` of every lane queue: far above any attempt limit the engine keeps.

Quorum queues on 3.10 put a requeued message back at its position only when the queue has a
delivery limit (without one it goes to the back); the engine dead-letters long before this
limit, which only backs it up (the broker then dead-letters into the group's letters queue)."""


def _short(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name``, or a unique shortened form of it when it exceeds ``limit`` bytes."""
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    head = name.encode()[: limit - len(digest) - 1].decode(errors="ignore")
    return f"{head}@{digest}"


class Topology:
    """The exchanges and queues of one ``exchange_prefix`` (see docs/providers/rabbitmq.md)."""

    def __init__(self, prefix: str, expires_ms: int | None = None, group_size: int | None = None) -> None:
        self.prefix = prefix
        self.expires_ms = expires_ms
        """``x-expires`` of every durable queue (``rabbitmq.queue_expires``), or None."""
        self.group_size = group_size
        """``x-quorum-initial-group-size`` of every quorum queue (``rabbitmq.quorum_initial_group_size``), or None."""

    def exchange(self, topic: str) -> str:
        """The direct exchange of ``topic``; the routing key is the partition number."""
        return _short(f"{self.prefix}:{topic}", MAX_EXCHANGE_BYTES)

    def backlog_exchange(self, topic: str) -> str:
        """The alternate exchange of ``topic``: what no group's queue takes lands here."""
        return _short(f"{self.prefix}:{topic}:@backlog", MAX_EXCHANGE_BYTES)

    def backlog_queue(self, topic: str, partition: int) -> str:
        """Messages of ``partition`` published while no group was bound, for the first group(s)."""
        return _short(f"{self.prefix}:{topic}:@backlog:{partition}")

    def meta_queue(self, topic: str) -> str:
        """An empty queue whose ``x-max-length`` records the topic's partition count."""
        return _short(f"{self.prefix}:{topic}:@partitions")

    def lane_queue(self, topic: str, group: str, partition: int) -> str:
        """The quorum queue of one lane: (topic, group, partition)."""
        return _short(f"{self.prefix}:{topic}:{group}:{partition}")

    def letters_queue(self, topic: str, group: str) -> str:
        """The group's dead letters (a classic queue read by ``dead_letters``)."""
        return _short(f"{self.prefix}:{topic}:{group}:@dlq")

    def note_queue(self, topic: str, group: str, partition: int) -> str:
        """The lane's retry note: attempt and not-before of the message being retried (last one wins)."""
        return _short(f"{self.prefix}:{topic}:{group}:{partition}:@note")

    def note_arguments(self) -> dict[str, Any]:
        """A quorum queue that keeps only the newest message."""
        return self._quorum({"x-max-length": 1, "x-overflow": "drop-head"})

    def legacy_note_arguments(self) -> dict[str, Any]:
        """The classic note queue an earlier version declared (kept where it exists)."""
        return self._expiring({"x-queue-type": "classic", "x-max-length": 1, "x-overflow": "drop-head"})

    def sched_queue(self, topic: str) -> str:
        """The topic's scheduled messages waiting for their time, and cancel markers (``_schedule.py``)."""
        return _short(f"{self.prefix}:{topic}:@sched")

    def lease_queue(self, topic: str, group: str, partition: int) -> str:
        """The exclusive queue whose holder owns the lane."""
        return _short(f"{self.prefix}:{topic}:{group}:{partition}:@lease")

    def members_exchange(self, topic: str, group: str) -> str:
        """The fanout exchange of the group's membership heartbeats and pending-count census."""
        return _short(f"{self.prefix}:{topic}:{group}:@members", MAX_EXCHANGE_BYTES)

    def member_queue(self, topic: str, group: str, member_id: str, join: str) -> str:
        """A member's exclusive queue on the members exchange, one per ``join`` (a name of the
        prefix, not a server-named ``amq.gen-...`` one: the user's permissions cover it)."""
        return _short(f"{self.prefix}:{topic}:{group}:@member:{member_id}:{join}")

    def census_queue(self, topic: str, group: str, census: str) -> str:
        """The exclusive queue one pending-count census gets its answers on (through
        :meth:`direct_exchange`)."""
        return _short(f"{self.prefix}:{topic}:{group}:@census:{census}")

    def dead_letter_exchange(self) -> str:
        """Where the broker's own dead-lettering (past the delivery limit) goes, and the
        engine's letters: the letters queues are bound to it under their own names."""
        return _short(f"{self.prefix}:@dead-letters", MAX_EXCHANGE_BYTES)

    def direct_exchange(self) -> str:
        """The provider's own direct exchange: retry notes and census answers reach their queue
        through it (bound under the queue's name). Nothing goes through the default exchange, so
        a user needs no permission outside its prefix (docs/security.md)."""
        return _short(f"{self.prefix}:@direct", MAX_EXCHANGE_BYTES)

    # -- arguments ---------------------------------------------------------------------------

    def _expiring(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.expires_ms is not None:
            arguments["x-expires"] = self.expires_ms
        return arguments

    def _quorum(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """A quorum queue: replicated over the cluster's nodes, so it outlives any one of them."""
        arguments = {"x-queue-type": "quorum", **arguments}
        if self.group_size is not None:
            arguments["x-quorum-initial-group-size"] = self.group_size
        return self._expiring(arguments)

    def meta_arguments(self, partitions: int) -> dict[str, Any]:
        """The partition-count marker, a quorum queue: its ``x-max-length`` cannot be redeclared
        differently."""
        return self._quorum({"x-max-length": partitions})

    def legacy_meta_arguments(self, partitions: int) -> dict[str, Any]:
        """The classic marker an earlier version declared (kept where it exists)."""
        return self._expiring({"x-max-length": partitions})

    def letters_arguments(self) -> dict[str, Any]:
        """A classic queue: a listing puts letters back in their place, uncounted. It lives on
        one node of a cluster (the letters are also in the replicated ``<topic>.dlq``)."""
        return self._expiring({"x-queue-type": "classic"})

    def lane_arguments(self, topic: str, group: str) -> dict[str, Any]:
        """A quorum queue with single active consumer and a delivery limit (keeps requeue
        positions), dead-lettering at least once into the group's letters queue."""
        return self._quorum({
            "x-single-active-consumer": True,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.dead_letter_exchange(),
            "x-dead-letter-routing-key": self.letters_queue(topic, group),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        })

    def sched_arguments(self) -> dict[str, Any]:
        """A quorum queue with single active consumer (the mover's lease) and no delivery limit:
        the consumer timeout of the server hands its messages back every half hour, and that
        must never dead-letter or drop one."""
        return self._quorum({"x-single-active-consumer": True})

    def backlog_arguments(self) -> dict[str, Any]:
        """A quorum queue with a delivery limit, so attempts are counted and positions kept."""
        return self._quorum({"x-delivery-limit": DELIVERY_LIMIT})
