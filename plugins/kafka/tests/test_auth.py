"""The Kafka provider as a least-privilege user of the Kafka ``scripts/brokers up kafka`` runs:
its SASL_PLAINTEXT listener (SCRAM-SHA-512) and its SASL_SSL listener (PLAIN) authenticate users
``tenant-a`` and ``tenant-b``, and the KRaft StandardAuthorizer lets each create, write and read
only the topics named ``<its prefix>.…`` and read only the consumer groups named so
(``kafka.name_prefix``; docs/security.md). The contract suite as tenant A, refused credentials,
each permission missing, permissions revoked mid-stream, tenants kept apart. ACLs are changed
through the open listener, whose ANONYMOUS is a super user of the test server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgbroker
import pytest
from aiokafka import AIOKafkaClient  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.protocol.admin import (  # type: ignore[import-untyped]
    CreateAclsRequest,
    DeleteAclsRequest,
    DescribeAclsRequest,
)
from msgbroker import AccessDeniedError, Message, MessageContext
from msgbroker_conformance import ConformanceHarness, ConformanceSuite, FencingCases

REPO = Path(__file__).resolve().parents[3]
HOW = "run `scripts/brokers up kafka` and load its settings (`set -a; . .brokers/env; set +a`)"

# Kafka's codes (org.apache.kafka.common.resource / acl)
TOPIC, GROUP = 2, 3
PREFIXED = 4
READ, WRITE, CREATE = 3, 4, 5
ALLOW = 3
OPERATIONS = {"Read": READ, "Write": WRITE, "Create": CREATE}
Acl = tuple[int, str, int, str, int]
"""(resource type, resource name, pattern type, principal, operation), always ALLOW from any host."""


@pytest.fixture(autouse=True)
def _collect_dropped_client_connections() -> Iterator[None]:
    """After each test, collect the connections aiokafka dropped unclosed, their
    ``ResourceWarning`` ignored (their finalizers close the sockets).

    Against the SASL listeners, aiokafka now and then leaves a connection whose socket stays
    registered with the event loop although nothing of the client refers to it any more
    (aio-libs/aiokafka#715 is one way: a handshake that fails or is cancelled after the socket
    connected). It becomes garbage only once its loop has closed, and the garbage collector then
    finds it in whichever later test it happens to run, where the project's ``error`` warning
    filter turned its warning into that test's error: "unclosed <socket ...
    raddr=('127.0.0.1', 9094)>", "unclosed transport", "loop is closed" (in 8 of 12 runs of this
    module on the development machine, 2026-12-07, after conformance cases and the
    refused-credentials test; once the collection fell inside an import and crashed pytest: "AST
    constructor recursion depth mismatch"). Collected here, it goes quietly, at a known point,
    before a later test or module trips over it. The rest of the Kafka tests (the plain listener)
    keep the warning filter as it is."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def setting(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(f"{name} is not set: {HOW}", pytrace=False)
    return value


def tenant(letter: str, **more: Any) -> dict[str, Any]:
    """The ``kafka`` settings of tenant ``letter`` on the SCRAM listener (with its password)."""
    return {
        "bootstrap_servers": setting("MSGBROKER_TEST_KAFKA_SASL_BOOTSTRAP_SERVERS"),
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": setting(f"MSGBROKER_TEST_KAFKA_SASL_USER_{letter}"),
        "sasl_password": setting(f"MSGBROKER_TEST_KAFKA_SASL_PASSWORD_{letter}"),
        "name_prefix": setting(f"MSGBROKER_TEST_KAFKA_SASL_PREFIX_{letter}"),
        # the brokers' default.replication.factor needs DescribeConfigs on the Cluster (docs/security.md)
        "replication_factor": 1,
        "session_timeout": 6,
        "heartbeat_interval": 1,
        "commit_interval": 0.05,
        **more,
    }


def passwords() -> list[str]:
    return [setting(f"MSGBROKER_TEST_KAFKA_SASL_PASSWORD_{x}") for x in "AB"] + [
        setting("MSGBROKER_TEST_KAFKA_SASL_ADMIN_PASSWORD")]


def assert_no_secret(text: str) -> None:
    for secret in passwords():
        assert secret not in text, "a password appears in the output"


def connect(kafka: dict[str, Any], **settings: Any) -> msgbroker.Broker:
    return msgbroker.connect(f"kafka://{kafka['bootstrap_servers']}", kafka=kafka, **settings)


# -- ACLs, changed as the open listener's super user --------------------------------------------


def tenant_acls(user: str, prefix: str) -> set[Acl]:
    principal = f"User:{user}"
    names = f"{prefix}."
    return {(TOPIC, names, PREFIXED, principal, CREATE), (TOPIC, names, PREFIXED, principal, WRITE),
            (TOPIC, names, PREFIXED, principal, READ), (GROUP, names, PREFIXED, principal, READ)}


async def acl_request(request: Any) -> Any:
    client = AIOKafkaClient(bootstrap_servers=setting("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS"), request_timeout_ms=10000)
    await client.bootstrap()
    try:
        return await client.send(client.get_random_node(), request)
    finally:
        await client.close()


async def granted(principal: str) -> set[Acl]:
    response = await acl_request(DescribeAclsRequest(1, None, 1, principal, None, 1, 1))
    assert response.error_code == 0, response
    return {(rtype, name, pattern, who, op) for rtype, name, pattern, acls in response.resources
            for who, _host, op, permission in acls if permission == ALLOW}


async def grant(*acls: Acl) -> None:
    for rtype, name, pattern, principal, op in acls:
        response = await acl_request(CreateAclsRequest(rtype, name, pattern, principal, "*", op, ALLOW))
        assert all(code == 0 for code, _ in response.creation_responses), response


async def revoke(*acls: Acl) -> None:
    for rtype, name, pattern, principal, op in acls:
        response = await acl_request(DeleteAclsRequest(rtype, name, pattern, principal, "*", op, ALLOW))
        assert all(code == 0 for code, _, _ in response.filter_responses), response


async def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- the contract suite as tenant A --------------------------------------------------------------


class TenantHarness(ConformanceHarness):
    """Tenant A on the SCRAM listener with exactly the ACLs docs/security.md lists; otherwise as
    test_conformance.KafkaHarness (tests run with --import-mode=importlib, so that module cannot
    be imported from here). Every case has its own topic and group names under the one prefix."""

    _servers = os.environ.get("MSGBROKER_TEST_KAFKA_SASL_BOOTSTRAP_SERVERS", "").strip()
    url: ClassVar[str | None] = f"kafka://{_servers}" if _servers else None
    url_env: ClassVar[str | None] = "MSGBROKER_TEST_KAFKA_SASL_BOOTSTRAP_SERVERS"
    timeout_multiplier: ClassVar[float] = 1.5

    def overrides(self, namespace: str) -> dict[str, Any]:
        kafka = tenant("A", client_id=f"conf-{namespace}")
        del kafka["commit_interval"]
        return {"kafka": kafka}

    async def restart_server(self) -> None:
        """``scripts/brokers restart kafka`` (the users and ACLs live in its metadata log)."""
        process = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "brokers"), "restart", "kafka",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 180)
        if process.returncode != 0:
            raise AssertionError(f"scripts/brokers restart kafka failed: {output.decode(errors='replace')[-2000:]}")


class TestConformanceAsTenant(ConformanceSuite, FencingCases):
    """The contract holds for a user with only the ACLs docs/security.md lists."""

    harness = TenantHarness()


# -- helpers ------------------------------------------------------------------------------------


class Item(Message):
    n: int

    @property
    def partition_key(self) -> str:
        return "k"


# -- refused credentials ------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["wrong password", "unknown user"])
async def test_refused_credentials_end_in_one_clear_error(who: str, caplog: pytest.LogCaptureFixture) -> None:
    user = "tenant-a" if who == "wrong password" else f"nobody-{uuid.uuid4().hex[:6]}"
    wrong = f"not-{setting('MSGBROKER_TEST_KAFKA_SASL_PASSWORD_A')}"
    kafka = tenant("A", sasl_username=user, sasl_password=wrong)
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(AccessDeniedError) as caught:
        async with connect(kafka) as broker:
            await broker.publish("t", Item(n=1))
    took = time.monotonic() - started
    text = str(caught.value)
    assert text.startswith(f"kafka: connecting to {kafka['bootstrap_servers']} failed"), text
    assert f"the server refused the credentials of user '{user}'" in text, text
    assert "SaslAuthenticationFailed" in text and "SCRAM-SHA-512" in text, text
    assert took < 15, f"a refused login took {took:.1f}s: retried?"
    assert_no_secret(text + "\n" + caplog.text)
    assert wrong not in text + caplog.text


async def test_plain_credentials_over_tls(caplog: pytest.LogCaptureFixture) -> None:
    """The SASL_SSL listener (PLAIN): tenant A is accepted with its password, refused without."""
    kafka = tenant("A", bootstrap_servers=setting("MSGBROKER_TEST_KAFKA_SASL_TLS_BOOTSTRAP_SERVERS"),
                   security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                   ssl_cafile=setting("MSGBROKER_TEST_TLS_CA_FILE"))
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.DEBUG)
    async with connect(kafka, partition_count=1) as broker:
        await broker.publish(topic, Item(n=1))
        assert await broker.pending_count(topic, "g") == 1
    with pytest.raises(AccessDeniedError, match="refused the credentials of user 'tenant-a'") as caught:
        async with connect({**kafka, "sasl_password": "wrong"}) as broker:
            await broker.publish(topic, Item(n=2))
    assert "PLAIN" in str(caught.value), caught.value
    assert_no_secret(str(caught.value) + "\n" + caplog.text)


# -- the permissions ----------------------------------------------------------------------------


def documented_acls() -> set[Acl]:
    """The ALLOW bindings of docs/security.md's ``kafka-acls.sh ... --add`` commands (Kafka
    section), for ``User:orders-svc``."""
    doc = (REPO / "docs" / "security.md").read_text()
    section = doc.split("\n## Kafka", 1)[1].split("\n## ", 1)[0]
    commands = re.sub(r"\\\n\s*", " ", section)
    found: set[Acl] = set()
    for line in commands.splitlines():
        if "kafka-acls.sh" not in line or "--add" not in line:
            continue
        principal = re.search(r"--allow-principal (\S+)", line)
        resource = re.search(r"--(topic|group) (\S+)", line)
        assert principal and resource and "--resource-pattern-type prefixed" in line, line
        rtype = TOPIC if resource[1] == "topic" else GROUP
        for op in re.findall(r"--operation (\w+)", line):
            found.add((rtype, resource[2], PREFIXED, principal[1], OPERATIONS[op]))
    assert found, "docs/security.md's Kafka section has no `kafka-acls.sh ... --add` command"
    return found


async def test_the_server_grants_the_tenants_exactly_the_documented_acls() -> None:
    documented = documented_acls()
    assert documented == tenant_acls("orders-svc", "orders"), documented
    for letter in "AB":
        user, prefix = setting(f"MSGBROKER_TEST_KAFKA_SASL_USER_{letter}"), setting(
            f"MSGBROKER_TEST_KAFKA_SASL_PREFIX_{letter}")
        assert await granted(f"User:{user}") == tenant_acls(user, prefix)


async def ignore(ctx: MessageContext[Item]) -> None:
    pass


@pytest.mark.parametrize("missing", ["Create on the topics", "Write on the topics", "Read on the topics",
                                     "Read on the groups"])
async def test_without_one_permission_the_operation_that_needs_it_is_refused(
    missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each ACL is needed (docs/security.md says what for): without it, the operation that needs
    it ends in AccessDeniedError naming the user and the operation, at once or — for a running
    subscription — by stopping it; nothing waits or retries without end."""
    kafka = tenant("A")
    user, prefix = kafka["sasl_username"], kafka["name_prefix"]
    topic = f"perm-{uuid.uuid4().hex[:8]}"
    kind, op = ("group" if "groups" in missing else "topic"), missing.split()[0]
    acl = (GROUP if kind == "group" else TOPIC, f"{prefix}.", PREFIXED, f"User:{user}", OPERATIONS[op])
    caplog.set_level(logging.DEBUG)
    async with connect(kafka, partition_count=1) as broker:
        await broker.publish(topic, Item(n=1))  # the topic exists with a message
    await revoke(acl)
    try:
        if missing == "Write on the topics":
            # the provider's idempotent producer starts at connect, and needs Write on some topic
            with pytest.raises(AccessDeniedError) as caught:
                async with connect(kafka, partition_count=1):
                    pass
            text = str(caught.value)
            assert "starting the idempotent producer" in text and f"user '{user}' has no permission" in text, text
            return
        async with connect(kafka, partition_count=1) as broker:
            if missing == "Create on the topics":
                await broker.publish(topic, Item(n=2))  # a topic made in advance is used as it is
                fresh = f"{topic}-new"
                with pytest.raises(AccessDeniedError) as caught:
                    await broker.publish(fresh, Item(n=1))
                text = str(caught.value)
                assert f"creating topic '{prefix}.{fresh}' failed: user '{user}' has no permission" in text, text
                assert "create the topic in advance" in text, text
                admin = AIOKafkaAdminClient(bootstrap_servers=setting("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS"))
                await admin.start()
                try:
                    await admin.create_topics([NewTopic(f"{prefix}.{fresh}", 1, 1)])
                finally:
                    await admin.close()
                await broker.publish(fresh, Item(n=1))  # an operator made it: fine now
                return
            started = time.monotonic()
            sub = await broker.subscribe(topic, "g", ignore)
            await wait_for(lambda: sub.failure is not None, "the subscription to stop on the refusal", 20)
            assert isinstance(sub.failure, AccessDeniedError), sub.failure
            text = str(sub.failure)
            doing = (f"joining group '{prefix}.g'" if kind == "group" else f"reading '{prefix}.{topic}'")
            assert doing in text and f"user '{user}' has no permission for it" in text, text
            assert "docs/security.md" in text, text
            assert time.monotonic() - started < 20
            if kind == "group":
                with pytest.raises(AccessDeniedError, match=f"group '{prefix}.g'"):
                    await broker.pending_count(topic, "g")
    finally:
        await grant(acl)
    assert_no_secret(caplog.text)


# -- tenants kept apart -------------------------------------------------------------------------


@pytest.mark.parametrize(("owner", "intruder"), [("B", "A"), ("A", "B")])
async def test_a_tenant_cannot_publish_read_or_list_the_dead_letters_of_another(owner: str, intruder: str) -> None:
    own_settings = tenant(owner)
    topic = f"iso-{uuid.uuid4().hex[:8]}"
    handled: list[int] = []

    async def reject(ctx: MessageContext[Item]) -> None:
        handled.append(ctx.message.n)
        await ctx.nak(requeue=False)

    # The owner has a message in its dead letters: there is something to steal.
    async with connect(own_settings, partition_count=1) as own:
        await own.publish(topic, Item(n=1))
        await own.subscribe(topic, "g", reject)
        await wait_for(lambda: own.dead_letters(topic, "g"), "the owner's dead letter")
        # the intruder's own credentials, the owner's prefix
        other_settings = {**tenant(intruder), "name_prefix": own_settings["name_prefix"]}
        intruder_user = other_settings["sasl_username"]
        async with connect(other_settings, partition_count=1) as other:
            for what, attempt in (("publish", lambda: other.publish(topic, Item(n=2))),
                                  ("read", lambda: other.subscribe(topic, "g", reject))):
                with pytest.raises(AccessDeniedError) as caught:
                    await attempt()
                text = str(caught.value)
                assert f"user '{intruder_user}' has no permission" in text, (what, text)
                assert f"'{own_settings['name_prefix']}.{topic}'" in text, f"the refusal names no topic: {text}"
            # Kafka lists only the topics a user may describe: the owner's are not there for it.
            assert await other.dead_letters(topic, "g") == []
            assert await other.pending_count(topic, "g") == 0
        assert handled == [1], "the intruder's publish or read reached the owner's topic"
        [letter] = await own.dead_letters(topic, "g")
        assert letter.message_id


# -- permissions revoked mid-stream -------------------------------------------------------------


async def test_revoked_permissions_stop_a_subscription_and_lose_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Kafka's authorizer checks every request, on connections already open too: once the
    tenant's Read ACLs are gone, the member holding the partition meets the refusal at its next
    fetch (or commit) and the one holding nothing at its next heartbeat. Both subscriptions stop
    with AccessDeniedError like a crash, and what they had not settled is delivered again once the
    ACLs are back."""
    kafka = tenant("A")
    user, prefix = kafka["sasl_username"], kafka["name_prefix"]
    topic = f"rv-{uuid.uuid4().hex[:8]}"
    reads = [acl for acl in tenant_acls(user, prefix) if acl[4] == READ]
    first: list[int] = []
    gate = asyncio.Event()

    async def hold_at_two(ctx: MessageContext[Item]) -> None:
        first.append(ctx.message.n)
        if ctx.message.n == 2:
            await gate.wait()

    caplog.set_level(logging.DEBUG)
    settings: dict[str, Any] = {"partition_count": 1, "shutdown_timeout": 2}
    try:
        async with connect(kafka, **settings) as broker:
            await broker.publish_batch(topic, [Item(n=i) for i in range(5)])
            sub = await broker.subscribe(topic, "g", hold_at_two)
            idle = await broker.subscribe(topic, "g", hold_at_two)  # one partition: this one holds nothing
            await wait_for(lambda: 2 in first, "message 2 in its handler")
            await revoke(*reads)
            gate.set()
            await wait_for(lambda: sub.failure is not None and idle.failure is not None,
                           "both subscriptions to stop on the refusal")
            for stopped in (sub, idle):
                assert isinstance(stopped.failure, AccessDeniedError), stopped.failure
                text = str(stopped.failure)
                assert text.startswith("kafka: ") and f"user '{user}' has no permission for it" in text, text
            stopped_logs = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
            assert stopped_logs and user in stopped_logs[0], caplog.text
            await sub.abort()
            await idle.abort()
        await grant(*reads)
        again: list[int] = []

        async def collect(ctx: MessageContext[Item]) -> None:
            again.append(ctx.message.n)

        async with connect(kafka, **settings) as broker:
            await broker.subscribe(topic, "g", collect)
            await wait_for(lambda: set(first) | set(again) == set(range(5)) and 2 in again,
                           "every message unsettled at the revocation delivered again")
    finally:
        await grant(*reads)
    reports = [r.getMessage() for r in caplog.records
               if r.levelno >= logging.ERROR and "kafka" in r.getMessage() and f"user '{user}'" in r.getMessage()]
    assert reports, "the refusal was not logged naming the user"
    assert_no_secret(caplog.text)


# -- a credential deleted mid-stream ------------------------------------------------------------


def kafka_configs(user: str, *args: str) -> None:
    """``kafka-configs --alter --entity-type users --entity-name USER ARGS`` (kafka.admin.ConfigCommand
    from the jars scripts/brokers fetched), through the open listener."""
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    lib = REPO / ".cache" / "kafka" / "lib"
    if not java or not lib.is_dir():
        pytest.fail(f"java or the Kafka jars ({lib}) are missing: {HOW}", pytrace=False)
    out = subprocess.run(
        [java, "-Xmx256m", "-cp", f"{lib}/*", "kafka.admin.ConfigCommand", "--bootstrap-server",
         setting("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS"), "--alter", "--entity-type", "users", "--entity-name", user,
         *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )
    assert out.returncode == 0, f"kafka-configs {' '.join(args[:1])} {user}: exit {out.returncode}: {out.stderr[-300:]}"


def add_scram_user(user: str, password: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".properties") as config:  # mode 0600
        config.write(f"SCRAM-SHA-512=iterations=8192,password={password}\n")
        config.flush()
        kafka_configs(user, "--add-config-file", config.name)


def refused_logins(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """aiokafka's records of a login the broker refused (one per connection attempt)."""
    return [r for r in caplog.records if r.name == "aiokafka" and "SaslAuthenticationFailed" in r.getMessage()]


async def restart_kafka() -> None:
    process = await asyncio.create_subprocess_exec(
        str(REPO / "scripts" / "brokers"), "restart", "kafka",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, f"scripts/brokers restart kafka failed: {output.decode(errors='replace')[-2000:]}"


async def test_a_credential_deleted_mid_stream_stops_the_subscription_once_it_logs_in_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kafka checks a credential at login only: deleting a SCRAM user leaves its open connections
    alone. Once they are made again (here: the broker restarted), every login is refused —
    aiokafka would retry without end, reading nothing. The member, without a group coordinator,
    tries one login every 2 s; refused for 20 s in a row, the subscription stops with
    AccessDeniedError, publishing raises it, the clients stop reconnecting, and what was not
    settled is delivered again to a user whose login is valid."""
    a = tenant("A")
    user, password = f"rotated-{uuid.uuid4().hex[:6]}", secrets.token_urlsafe(18)
    acls = tenant_acls(user, a["name_prefix"])
    kafka = {**a, "sasl_username": user, "sasl_password": password}
    topic = f"cred-{uuid.uuid4().hex[:8]}"
    settings: dict[str, Any] = {"partition_count": 1, "shutdown_timeout": 2}
    first: list[int] = []
    gate = asyncio.Event()

    async def hold_at_zero(ctx: MessageContext[Item]) -> None:
        first.append(ctx.message.n)
        if ctx.message.n == 0:
            await gate.wait()

    caplog.set_level(logging.DEBUG)
    await asyncio.to_thread(add_scram_user, user, password)
    await grant(*acls)
    try:
        async with connect(kafka, **settings) as broker:
            await broker.publish_batch(topic, [Item(n=i) for i in range(3)])
            sub = await broker.subscribe(topic, "g", hold_at_zero)
            await wait_for(lambda: first == [0], "message 0 in its handler")
            await asyncio.to_thread(kafka_configs, user, "--delete-config", "SCRAM-SHA-512")
            await restart_kafka()
            gate.set()
            await wait_for(lambda: sub.failure is not None, "the subscription to stop on the refused login", 90)
            assert isinstance(sub.failure, AccessDeniedError), sub.failure
            text = str(sub.failure)
            assert text.startswith(f"kafka: reconnecting to {kafka['bootstrap_servers']} failed"), text
            assert f"the server refused the credentials of user '{user}'" in text, text
            with pytest.raises(AccessDeniedError, match=f"user '{user}'"):
                await broker.publish(topic, Item(n=9))
            await sub.abort()
            async def quiet() -> bool:  # no refused login for 2 s: the clients stopped reconnecting
                before = len(refused_logins(caplog))
                await asyncio.sleep(2)
                return len(refused_logins(caplog)) == before

            await wait_for(quiet, "the clients to stop reconnecting (each stop is bounded by 10 s)", 15)
        again: list[int] = []

        async def collect(ctx: MessageContext[Item]) -> None:
            again.append(ctx.message.n)

        async with connect(a, **settings) as broker:  # tenant A: same prefix, same group
            await broker.subscribe(topic, "g", collect)
            await wait_for(lambda: 0 in again and set(first) | set(again) == {0, 1, 2},
                           "the message held at the refusal delivered again")
    finally:
        await revoke(*acls)
        with contextlib.suppress(AssertionError):
            await asyncio.to_thread(kafka_configs, user, "--delete-config", "SCRAM-SHA-512")
    assert_no_secret(caplog.text)
    assert password not in caplog.text
