"""The group's partition assignor: round robin over the members, except that a partition a
member pinned with ``subscribe_to_partition`` goes to that member only (exclusive)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping

from aiokafka.cluster import ClusterMetadata  # type: ignore[import-untyped]
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor  # type: ignore[import-untyped]
from aiokafka.coordinator.protocol import (  # type: ignore[import-untyped]
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

__all__ = ["PROTOCOL_NAME", "PinningAssignor", "assign_members", "decode_pin", "encode_pin"]

log = logging.getLogger("msgbroker.kafka")

PROTOCOL_NAME = "msgbroker-pinning"
"""The assignment protocol every msgbroker member of a Kafka group announces."""


def encode_pin(pinned: int | None, holding: bool, since: int = 0) -> bytes:
    """A member's subscription user data: ``pin=<partition>;since=<ms>[;held]`` or empty."""
    if pinned is None:
        return b""
    return f"pin={pinned};since={since}{';held' if holding else ''}".encode()


def decode_pin(user_data: bytes | None) -> tuple[int | None, bool, int]:
    """The (pinned partition, currently holding it, pinned since) of :func:`encode_pin`."""
    text = (user_data or b"").decode("ascii", errors="replace")
    if not text.startswith("pin="):
        return None, False, 0
    fields = dict(part.partition("=")[::2] for part in text.split(";"))
    try:
        return int(fields["pin"]), "held" in fields, int(fields.get("since") or 0)
    except ValueError:
        return None, False, 0


def assign_members(
    partitions_by_topic: Mapping[str, Iterable[int]],
    subscriptions: Mapping[str, tuple[Iterable[str], int | None]],
    holding: Iterable[str] = (),
    since: Mapping[str, int] | None = None,
) -> dict[str, dict[str, list[int]]]:
    """member -> topic -> partitions. ``subscriptions`` is member -> (topics, pinned partition);
    ``holding`` are the members that held their pinned partition in the last generation.

    A pinned partition goes to one of its pinners and to nobody else: the one that held it
    (so a holder keeps it while a second asker waits), else the one that asked first (``since``,
    milliseconds), else the first by member id; the other
    pinners get nothing (hot standbys). The remaining partitions of a topic go round robin
    over the members subscribed to it that pinned nothing.
    """
    holders = set(holding)
    out: dict[str, dict[str, list[int]]] = {m: defaultdict(list) for m in subscriptions}
    for topic in sorted(partitions_by_topic):
        partitions = sorted(partitions_by_topic[topic])
        members = sorted(m for m, (topics, _) in subscriptions.items() if topic in set(topics))
        pinned: dict[int, str] = {}
        for member in sorted(members, key=lambda m: (m not in holders, (since or {}).get(m, 0), m)):
            pin = subscriptions[member][1]
            if pin is not None and pin in partitions and pin not in pinned:
                pinned[pin] = member
        wanted = {subscriptions[m][1] for m in members if subscriptions[m][1] is not None}
        for partition, member in pinned.items():
            out[member][topic].append(partition)
        free = [m for m in members if subscriptions[m][1] is None]
        rest = [p for p in partitions if p not in wanted]
        for index, partition in enumerate(rest):
            if free:
                out[free[index % len(free)]][topic].append(partition)
    return {m: {t: sorted(ps) for t, ps in topics.items()} for m, topics in out.items()}


class PinningAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """An aiokafka assignor instance for one member (``pinned`` is its exclusive partition)."""

    name = PROTOCOL_NAME
    version = 0

    def __init__(self, pinned: int | None) -> None:
        self.pinned = pinned
        self.holding = False
        self.since = int(time.time() * 1000)
        self.blind: set[str] = set()
        """Topics the last assignment this member computed (as the group's leader) had no
        partition metadata for: nobody was given their partitions (see ``_consumer._watch_group``)."""

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        user_data = encode_pin(self.pinned, self.holding, self.since)
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), user_data)

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = {t for meta in members.values() for t in meta.subscription}
        partitions_by_topic: dict[str, set[int]] = {}
        self.blind = set()
        for topic in topics:
            known = cluster.partitions_for_topic(topic)
            if known is None:
                log.warning("kafka: no partition metadata for topic %s while assigning", topic)
                self.blind.add(topic)
                continue
            partitions_by_topic[topic] = set(known)
        pins = {m: decode_pin(meta.user_data) for m, meta in members.items()}
        plan = assign_members(
            partitions_by_topic,
            {m: (meta.subscription, pins[m][0]) for m, meta in members.items()},
            [m for m, (_, held, _) in pins.items() if held],
            {m: asked for m, (_, _, asked) in pins.items()},
        )
        return {
            member: ConsumerProtocolMemberAssignment(self.version, sorted(plan[member].items()), b"")
            for member in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        """Remember whether this member got its pinned partition (it claims it next time)."""
        if self.pinned is not None:
            self.holding = any(self.pinned in partitions for _, partitions in assignment.assignment)
