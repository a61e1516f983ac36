"""Kafka ACLs and the tenants' permissions on the Kafka of kafka_server (docs/security.md, Kafka).

aiokafka has no ACL calls in its admin client but speaks the CreateAcls, DescribeAcls and
DeleteAcls requests (v1: resource pattern types); they are sent here through its public
``AIOKafkaClient``, as the super user ANONYMOUS of the open listener."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TENANTS = ("a", "b")
"""Tenant A and tenant B: users ``tenant-a`` and ``tenant-b``, whose every topic and consumer group
is named ``tenant-a.…`` / ``tenant-b.…`` (the provider's ``kafka.name_prefix``)."""

# Kafka's codes (org.apache.kafka.common.resource / acl)
TOPIC, GROUP, CLUSTER = 2, 3, 4
LITERAL, PREFIXED = 3, 4
ANY_PATTERN = 1
READ, WRITE, CREATE, DESCRIBE, DESCRIBE_CONFIGS = 3, 4, 5, 8, 10
ALLOW = 3
ANY_HOST = "*"
RESOURCE_NAMES = {TOPIC: "Topic", GROUP: "Group", CLUSTER: "Cluster"}
OPERATION_NAMES = {READ: "Read", WRITE: "Write", CREATE: "Create", DESCRIBE: "Describe",
                   DESCRIBE_CONFIGS: "DescribeConfigs"}


@dataclass(frozen=True)
class Acl:
    """One ALLOW binding: ``principal`` may do ``operation`` on the resources that ``name``
    matches (``pattern``: LITERAL or PREFIXED) from any host."""

    resource: int
    name: str
    pattern: int
    principal: str
    operation: int

    def describe(self) -> str:
        kind = "prefixed" if self.pattern == PREFIXED else "literal"
        return (f"{self.principal} may {OPERATION_NAMES.get(self.operation, self.operation)} "
                f"{RESOURCE_NAMES.get(self.resource, self.resource)} {kind} {self.name!r}")


def tenant_acls(user: str, prefix: str) -> list[Acl]:
    """What a service user of ``kafka.name_prefix`` ``prefix`` needs (docs/security.md lists
    the same): create, write and read the topics named ``<prefix>.…`` and read the consumer
    groups named ``<prefix>.…``. Read and Write imply Describe."""
    principal = f"User:{user}"
    names = f"{prefix}."
    return [
        Acl(TOPIC, names, PREFIXED, principal, CREATE),
        Acl(TOPIC, names, PREFIXED, principal, WRITE),
        Acl(TOPIC, names, PREFIXED, principal, READ),
        Acl(GROUP, names, PREFIXED, principal, READ),
    ]


def all_tenant_acls() -> list[Acl]:
    return [acl for t in TENANTS for acl in tenant_acls(f"tenant-{t}", f"tenant-{t}")]


async def _client(bootstrap: str) -> Any:
    from aiokafka import AIOKafkaClient  # type: ignore[import-untyped]

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await client.bootstrap()
    return client


def _check(errors: list[tuple[int, str | None]], doing: str) -> None:
    failed = [f"error {code}: {message}" for code, message in errors if code]
    if failed:
        raise RuntimeError(f"kafka: {doing} failed: {'; '.join(failed)}")


async def list_acls(bootstrap: str, principal: str | None = None) -> set[Acl]:
    """Every ALLOW binding on the cluster (of ``principal`` only, when given)."""
    from aiokafka.protocol.admin import DescribeAclsRequest  # type: ignore[import-untyped]

    client = await _client(bootstrap)
    try:
        # 1 = ANY for the resource type, the operation and the permission type
        request = DescribeAclsRequest(1, None, ANY_PATTERN, principal, None, 1, 1)
        response = await client.send(client.get_random_node(), request)
        _check([(response.error_code, response.error_message)], "describing the ACLs")
        found: set[Acl] = set()
        for resource_type, name, pattern, acls in response.resources:
            for who, _host, operation, permission in acls:
                if permission == ALLOW:
                    found.add(Acl(resource_type, name, pattern, who, operation))
        return found
    finally:
        await client.close()


async def create_acls(bootstrap: str, acls: list[Acl]) -> None:
    from aiokafka.protocol.admin import CreateAclsRequest

    client = await _client(bootstrap)
    try:
        for acl in acls:
            request = CreateAclsRequest(acl.resource, acl.name, acl.pattern, acl.principal, ANY_HOST,
                                        acl.operation, ALLOW)
            response = await client.send(client.get_random_node(), request)
            _check([(code, message) for code, message in response.creation_responses],
                   f"creating the ACL '{acl.describe()}'")
    finally:
        await client.close()


async def delete_acls(bootstrap: str, acls: list[Acl]) -> None:
    from aiokafka.protocol.admin import DeleteAclsRequest

    client = await _client(bootstrap)
    try:
        for acl in acls:
            request = DeleteAclsRequest(acl.resource, acl.name, acl.pattern, acl.principal, ANY_HOST,
                                        acl.operation, ALLOW)
            response = await client.send(client.get_random_node(), request)
            _check([(code, message) for code, message, _ in response.filter_responses],
                   f"deleting the ACL '{acl.describe()}'")
    finally:
        await client.close()
