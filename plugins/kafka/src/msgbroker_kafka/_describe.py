"""``Transport.describe`` on Kafka: the group coordinator's word on members and assignment
(DescribeGroups) added to the interface's default view (docs/dashboard.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from aiokafka.coordinator.protocol import (  # type: ignore[import-untyped]
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from msgbroker.spi import GroupView, MemberView

__all__ = ["with_group_members"]


def with_group_members(view: GroupView, described: Sequence[Any], kafka_topic: str) -> GroupView:
    """``view`` with the members of ``described`` (``describe_consumer_groups``' responses) that
    subscribe to ``kafka_topic``, and the partitions of it each is assigned. Member ids are
    Kafka's (``<client id>-<uuid>``); Kafka keeps no join time."""
    members: list[MemberView] = []
    owners: dict[int, str] = {}
    for response in described:
        for group in response.to_object()["groups"]:
            for member in group["members"]:
                metadata, assignment = member["member_metadata"], member["member_assignment"]
                topics = ConsumerProtocolMemberMetadata.decode(metadata).subscription if metadata else []
                held = sorted(p for topic, partitions in
                              (ConsumerProtocolMemberAssignment.decode(assignment).assignment if assignment else [])
                              if topic == kafka_topic for p in partitions)
                if kafka_topic not in topics and not held:
                    continue  # a member of the same group name on another topic
                members.append(MemberView(member["member_id"], None, tuple(held)))
                owners.update(dict.fromkeys(held, member["member_id"]))
    partitions = tuple(replace(part, owner=owners.get(part.partition)) for part in view.partitions)
    return replace(view, partitions=partitions, members=tuple(sorted(members, key=lambda m: m.member_id)))
