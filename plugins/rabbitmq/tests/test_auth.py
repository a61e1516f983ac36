"""The RabbitMQ provider as a least-privilege user of the server ``scripts/brokers up rabbitmq``
runs: tenants ``tenant-a`` and ``tenant-b`` share the virtual host ``msgbroker-tenants``, each
allowed to configure, write and read only the exchanges and queues of its own exchange prefix
(docs/security.md). The contract suite as tenant A, refused credentials, a missing permission,
permissions revoked mid-stream, tenants kept apart."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import msgbroker
import pytest
from msgbroker import AccessDeniedError, Message, MessageContext
from msgbroker_conformance import ConformanceHarness, ConformanceSuite

REPO = Path(__file__).resolve().parents[3]
HOW = "run `scripts/brokers up rabbitmq` and load its settings (`set -a; . .brokers/env; set +a`)"
VHOST = "msgbroker-tenants"
NODE_DIR = REPO / ".brokers" / "rabbitmq"
"""Where scripts/brokers keeps the node: its Erlang cookie (home/) and its epmd's port."""
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"  # Debian's /usr/sbin wrapper switches to the rabbitmq user


def setting(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(f"{name} is not set: {HOW}", pytrace=False)
    return value


def redacted(url: str) -> str:
    """``url`` with its password as ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port}"))


async def restart_rabbitmq() -> None:
    """``scripts/brokers restart rabbitmq`` (users, vhost and permissions live in its data)."""
    process = await asyncio.create_subprocess_exec(
        str(REPO / "scripts" / "brokers"), "restart", "rabbitmq",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"scripts/brokers restart rabbitmq failed ({process.returncode}): "
                           f"{output.decode()[-2000:]}")


class TenantHarness(ConformanceHarness):
    """Tenant A: its URL (user, password, vhost) and its exchange prefix, exactly as
    docs/security.md's permissions allow; otherwise as test_conformance.RabbitMQHarness (tests
    run with --import-mode=importlib, so that module cannot be imported from here). Every case
    has its own topic and group names, so the cases share the one prefix the user may use."""

    url = os.environ.get("MSGBROKER_TEST_RABBITMQ_AUTH_URL_A") or None
    url_env = "MSGBROKER_TEST_RABBITMQ_AUTH_URL_A"
    timeout_multiplier = 1.0
    prefix: ClassVar[str] = os.environ.get("MSGBROKER_TEST_RABBITMQ_AUTH_PREFIX_A", "")

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"rabbitmq": {"exchange_prefix": self.prefix, "claim_timeout": 2, "queue_expires": 300}}

    def describe(self) -> str:
        return f"{type(self).__name__}({redacted(self.url) if self.url else 'no url'})"

    async def restart_server(self) -> None:
        await restart_rabbitmq()


class TestConformanceAsTenant(ConformanceSuite):
    """The contract holds for a user with only the permissions docs/security.md lists."""

    harness = TenantHarness()


# -- helpers ------------------------------------------------------------------------------------


class Item(Message):
    n: int

    @property
    def partition_key(self) -> str:
        return "k"


def tenant(letter: str) -> tuple[str, str]:
    """(url with user, password and vhost; exchange prefix) of tenant ``letter``."""
    return (setting(f"MSGBROKER_TEST_RABBITMQ_AUTH_URL_{letter}"),
            setting(f"MSGBROKER_TEST_RABBITMQ_AUTH_PREFIX_{letter}"))


def secret_of(url: str) -> str:
    password = urlsplit(url).password
    assert password, f"{redacted(url)} has no password"
    return password


def with_login(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, "a password appears in the output"


def rule(prefix: str) -> str:
    """The configure/write/read regex docs/security.md gives a user of exchange prefix ``prefix``."""
    return "^" + prefix.replace(".", "\\.") + ":"


def rabbitmqctl_sync(*args: str) -> str:
    """``rabbitmqctl -n msgbroker@localhost ARGS`` against the server of scripts/brokers; its output."""
    port_file = NODE_DIR / "epmd_port"
    if not port_file.exists():
        pytest.fail(f"{port_file} is missing: {HOW}", pytrace=False)
    env = {**os.environ, "HOME": str(NODE_DIR / "home"), "ERL_EPMD_ADDRESS": "127.0.0.1",
           "ERL_EPMD_PORT": port_file.read_text().strip()}
    out = subprocess.run([RABBITMQCTL, "-n", "msgbroker@localhost", *args], env=env, capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert out.returncode == 0, f"rabbitmqctl {' '.join(args)}: exit {out.returncode}: {out.stderr[-500:]}"
    return out.stdout


async def rabbitmqctl(*args: str) -> str:
    """:func:`rabbitmqctl_sync` off the event loop (the brokers' heartbeats go on meanwhile)."""
    return await asyncio.to_thread(rabbitmqctl_sync, *args)


async def grant(user: str, configure: str, write: str, read: str) -> None:
    await rabbitmqctl("set_permissions", "-p", VHOST, user, configure, write, read)


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


def connection_attempts(caplog: pytest.LogCaptureFixture) -> int:
    """AMQP connections opened so far (aiormq logs each attempt at DEBUG)."""
    return sum(1 for r in caplog.records if r.name.startswith("aiormq") and r.getMessage().startswith("Connecting to"))


# -- refused credentials ------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["wrong password", "unknown user"])
async def test_refused_credentials_end_in_one_clear_error(who: str, caplog: pytest.LogCaptureFixture) -> None:
    url, prefix = tenant("A")
    wrong = f"not-{secret_of(url)}"
    user = "tenant-a" if who == "wrong password" else f"nobody-{uuid.uuid4().hex[:6]}"
    bad = with_login(url, user, wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AccessDeniedError) as caught:
        async with msgbroker.connect(bad, rabbitmq={"exchange_prefix": prefix}) as broker:
            await broker.publish("t", Item(n=1))
    text = str(caught.value)
    assert "rabbitmq" in text and "connecting" in text and "refused the credentials" in text, text
    assert f"user '{user}'" in text and f"{user}:***@" in text, f"the message does not name the user: {text}"
    assert "ACCESS_REFUSED" in text, text
    assert connection_attempts(caplog) == 1, "a refused login was tried again"
    assert_no_secret(text + "\n" + caplog.text, wrong, secret_of(url))


async def test_credentials_over_tls(caplog: pytest.LogCaptureFixture) -> None:
    """The same user over the server's TLS port: accepted with its password, refused without."""
    url, prefix = tenant("A")
    tls = urlsplit(setting("MSGBROKER_TEST_RABBITMQ_TLS_URL"))
    tls_url = with_login(urlunsplit(tls._replace(path=f"/{VHOST}")), "tenant-a", secret_of(url))
    settings = {"exchange_prefix": prefix, "ssl_cafile": setting("MSGBROKER_TEST_TLS_CA_FILE"), "queue_expires": 60}
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.DEBUG)
    async with msgbroker.connect(tls_url, rabbitmq=settings, partition_count=1) as broker:
        await broker.publish(topic, Item(n=1))
        assert await broker.pending_count(topic, "g") == 1
        await broker.transport.delete_topic(topic, ["g"])
    with pytest.raises(AccessDeniedError, match="refused the credentials") as caught:
        async with msgbroker.connect(with_login(tls_url, "tenant-a", "wrong"), rabbitmq=settings) as broker:
            await broker.publish(topic, Item(n=2))
    assert_no_secret(str(caught.value) + "\n" + caplog.text, secret_of(url))


# -- the permissions ----------------------------------------------------------------------------


def documented_grant() -> tuple[str, str, str]:
    """The configure, write and read regexes of docs/security.md's ``set_permissions`` line."""
    doc = (REPO / "docs" / "security.md").read_text()
    section = doc.split("## RabbitMQ", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"rabbitmqctl set_permissions -p \S+ orders-svc '([^']*)' '([^']*)' '([^']*)'", section)
    assert found, "docs/security.md's RabbitMQ section has no `rabbitmqctl set_permissions ... orders-svc` line"
    return found[1], found[2], found[3]


async def test_the_server_grants_the_tenants_exactly_the_documented_permissions() -> None:
    documented = documented_grant()
    assert documented == (rule("orders"),) * 3, documented
    listed = json.loads(await rabbitmqctl("list_permissions", "-p", VHOST, "--formatter", "json", "-q"))
    granted = {p["user"]: (p["configure"], p["write"], p["read"]) for p in listed}
    for letter in "AB":
        _, prefix = tenant(letter)
        assert granted.get(prefix) == tuple(d.replace("orders", prefix) for d in documented), granted


@pytest.mark.parametrize("missing", ["configure", "write", "read"])
async def test_without_one_permission_the_first_declaration_is_refused(
    missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each of the three is needed on the prefix's names: without any one, the first publish
    (and subscribe) of a topic ends in AccessDeniedError naming the user and the operation."""
    url, prefix = tenant("A")
    allowed = {kind: (rule(prefix) if kind != missing else "^$") for kind in ("configure", "write", "read")}
    topic = f"perm-{uuid.uuid4().hex[:8]}"

    async def ignore(ctx: MessageContext[Item]) -> None:
        pass

    caplog.set_level(logging.DEBUG)
    await grant(prefix, allowed["configure"], allowed["write"], allowed["read"])
    try:
        async with msgbroker.connect(url, rabbitmq={"exchange_prefix": prefix, "queue_expires": 60},
                                     partition_count=1) as broker:
            for operation, attempt in (("publish", lambda: broker.publish(topic, Item(n=1))),
                                       ("subscribe", lambda: broker.subscribe(topic, "g", ignore))):
                with pytest.raises(AccessDeniedError) as caught:
                    await attempt()
                text = str(caught.value)
                assert f"declaring topic '{topic}' failed" in text, (operation, text)
                assert "user 'tenant-a' has no permission for it" in text and "ACCESS_REFUSED" in text, text
                assert "docs/security.md" in text, text
    finally:
        await grant(prefix, rule(prefix), rule(prefix), rule(prefix))
    assert_no_secret(caplog.text, secret_of(url))


# -- tenants kept apart -------------------------------------------------------------------------


@pytest.mark.parametrize(("owner", "intruder"), [("B", "A"), ("A", "B")])
async def test_a_tenant_cannot_publish_read_or_list_the_dead_letters_of_another(owner: str, intruder: str) -> None:
    url_owner, prefix_owner = tenant(owner)
    url_intruder, prefix_intruder = tenant(intruder)
    topic = f"iso-{uuid.uuid4().hex[:8]}"
    handled: list[int] = []

    async def reject(ctx: MessageContext[Item]) -> None:
        handled.append(ctx.message.n)
        await ctx.nak(requeue=False)

    settings: dict[str, Any] = {"claim_timeout": 2, "queue_expires": 120}
    # The owner has a message in its dead letters: there is something to steal.
    async with msgbroker.connect(url_owner, rabbitmq={"exchange_prefix": prefix_owner, **settings},
                                 partition_count=1) as own:
        await own.publish(topic, Item(n=1))
        await own.subscribe(topic, "g", reject)
        await wait_for(lambda: own.dead_letters(topic, "g"), "the owner's dead letter")
        async with msgbroker.connect(url_intruder, rabbitmq={"exchange_prefix": prefix_owner, **settings},
                                     partition_count=1) as other:
            for what, attempt in (("publish", lambda: other.publish(topic, Item(n=2))),
                                  ("read", lambda: other.subscribe(topic, "g", reject)),
                                  ("list the dead letters", lambda: other.dead_letters(topic, "g")),
                                  ("count the pending messages", lambda: other.pending_count(topic, "g"))):
                with pytest.raises(AccessDeniedError) as caught:
                    await attempt()
                text = str(caught.value)
                assert f"user '{prefix_intruder}' has no permission" in text and "ACCESS_REFUSED" in text, (what, text)
                assert f"'{prefix_owner}:" in text, f"the refusal does not name the owner's object: {text}"
        assert handled == [1], "the intruder's publish or read reached the owner's topic"
        [letter] = await own.dead_letters(topic, "g")
        assert letter.message_id
        await own.transport.delete_topic(topic, ["g"])


async def test_a_passive_declaration_is_not_checked() -> None:
    """What docs/security.md warns about: RabbitMQ checks no permission on a passive
    queue.declare, so a user of the same vhost learns whether another tenant's queue exists and
    how many messages wait in it (not what they say)."""
    url_b, prefix_b = tenant("B")
    url_a, _ = tenant("A")
    topic = f"peek-{uuid.uuid4().hex[:8]}"
    async with msgbroker.connect(url_b, rabbitmq={"exchange_prefix": prefix_b, "queue_expires": 60},
                                 partition_count=1) as b:
        await b.publish(topic, Item(n=1))  # no group yet: it waits in the topic's backlog queue
        connection = await aio_pika.connect(url_a, timeout=10)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"{prefix_b}:{topic}:@backlog:0", passive=True)
            assert queue.declaration_result.message_count == 1
        finally:
            await connection.close()
        await b.transport.delete_topic(topic, [])


# -- permissions revoked mid-stream -------------------------------------------------------------


@pytest.mark.parametrize("revoke", ["clear_permissions", "set_permissions ^$"])
async def test_revoked_permissions_stop_a_subscription_and_lose_nothing(
    revoke: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ checks a permission when a channel first uses a resource and keeps the answer for
    the channel's life, so revoking takes closing the user's connections too (docs/security.md).
    The members' reconnects are then refused (no access to the vhost, or their topic's
    declaration refused): both subscriptions stop with AccessDeniedError like a crash — the one
    holding the partition and the one holding nothing — and what they had not settled is
    delivered again once the permissions are back."""
    url, prefix = tenant("A")
    topic = f"rv-{uuid.uuid4().hex[:8]}"
    settings: dict[str, Any] = {"rabbitmq": {"exchange_prefix": prefix, "claim_timeout": 2, "queue_expires": 120},
                                "partition_count": 1, "shutdown_timeout": 2}
    first: list[int] = []
    gate = asyncio.Event()

    async def hold_at_two(ctx: MessageContext[Item]) -> None:
        first.append(ctx.message.n)
        if ctx.message.n == 2:
            await gate.wait()

    caplog.set_level(logging.DEBUG)
    try:
        async with msgbroker.connect(url, **settings) as broker:
            await broker.publish_batch(topic, [Item(n=i) for i in range(5)])
            sub = await broker.subscribe(topic, "g", hold_at_two)
            idle = await broker.subscribe(topic, "g", hold_at_two)  # a second member: one partition, so no lane
            await wait_for(lambda: 2 in first, "message 2 in its handler")
            if revoke == "clear_permissions":
                await rabbitmqctl("clear_permissions", "-p", VHOST, prefix)
            else:
                await grant(prefix, "^$", "^$", "^$")
            await rabbitmqctl("close_all_user_connections", prefix, "permissions revoked by test_auth")
            gate.set()
            # The subscription stops by itself with the refusal (no endless reconnecting), like a crash.
            await wait_for(lambda: sub.failure is not None and idle.failure is not None,
                           "both subscriptions to stop on the refusal")
            assert isinstance(sub.failure, AccessDeniedError), sub.failure
            assert isinstance(idle.failure, AccessDeniedError), idle.failure
            text = str(sub.failure)
            assert "rabbitmq" in text and "user 'tenant-a'" in text, text
            # Cleared, the vhost refuses the reconnect; but the partition may have moved to the
            # second member, and a hand-over whose grace ran out before the connections were
            # closed meets the refusal on its still open channel (writing the lane's note).
            assert "has no permission for it" in text or (
                revoke == "clear_permissions"
                and f"opening virtual host '{VHOST}' for user 'tenant-a': the user has no permissions on it" in text
            ), text
            stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
            assert stopped and "tenant-a" in stopped[0], caplog.text
            with pytest.raises(AccessDeniedError):  # the publisher's connection was refused too
                await broker.publish(topic, Item(n=9))
            attempts = connection_attempts(caplog)
            await asyncio.sleep(1.5)  # several reconnect rounds' worth: none may start
            assert connection_attempts(caplog) == attempts, "a refused connection is being retried"
            await sub.abort()
            await idle.abort()
        await grant(prefix, rule(prefix), rule(prefix), rule(prefix))
        again: list[int] = []

        async def collect(ctx: MessageContext[Item]) -> None:
            again.append(ctx.message.n)

        async with msgbroker.connect(url, **settings) as broker:
            await broker.subscribe(topic, "g", collect)
            await wait_for(lambda: set(first) | set(again) == set(range(5)) and 2 in again,
                           "every message unsettled at the revocation delivered again")
            await broker.transport.delete_topic(topic, ["g"])
    finally:
        await grant(prefix, rule(prefix), rule(prefix), rule(prefix))
    reports = [r.getMessage() for r in caplog.records
               if r.levelno >= logging.ERROR and "rabbitmq" in r.getMessage() and "user 'tenant-a'" in r.getMessage()]
    assert reports, "the refusal was not logged naming the user"
    assert_no_secret(caplog.text, secret_of(url))


async def test_a_password_changed_mid_stream_stops_the_subscription(caplog: pytest.LogCaptureFixture) -> None:
    """A revoked credential: the user's password changed on the server and its connections
    closed (rabbitmqctl change_password, close_all_user_connections). The members' reconnects are
    refused: the subscription stops with AccessDeniedError naming the user (no reconnect loop),
    and what it had not settled is delivered again to a member with the new password."""
    url, prefix = tenant("A")
    user, old, new = f"pw-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex, uuid.uuid4().hex
    topic = f"pw-{uuid.uuid4().hex[:8]}"
    settings: dict[str, Any] = {"rabbitmq": {"exchange_prefix": prefix, "claim_timeout": 2, "queue_expires": 120},
                                "partition_count": 1, "shutdown_timeout": 2}
    first: list[int] = []
    gate = asyncio.Event()

    async def hold_at_one(ctx: MessageContext[Item]) -> None:
        first.append(ctx.message.n)
        if ctx.message.n == 1:
            await gate.wait()

    caplog.set_level(logging.DEBUG)
    await rabbitmqctl("add_user", user, old)
    try:
        await grant(user, rule(prefix), rule(prefix), rule(prefix))
        async with msgbroker.connect(with_login(url, user, old), **settings) as broker:
            await broker.publish_batch(topic, [Item(n=i) for i in range(4)])
            sub = await broker.subscribe(topic, "g", hold_at_one)
            await wait_for(lambda: 1 in first, "message 1 in its handler")
            await rabbitmqctl("change_password", user, new)
            await rabbitmqctl("close_all_user_connections", user, "password changed by test_auth")
            gate.set()
            await wait_for(lambda: sub.failure is not None, "the subscription to stop on the refused credentials")
            assert isinstance(sub.failure, AccessDeniedError), sub.failure
            text = str(sub.failure)
            assert "rabbitmq" in text and "refused the credentials" in text and f"user '{user}'" in text, text
            # the broker's own (publisher) connection was closed too: it tries once, is refused and
            # gives up as well — only then may no connection attempt follow
            await wait_for(lambda: any("msgbroker-publisher is not restored" in r.getMessage() for r in caplog.records),
                           "the publisher connection to give up on the refused credentials")
            attempts = connection_attempts(caplog)
            await asyncio.sleep(1.5)  # several reconnect rounds' worth: none may start
            assert connection_attempts(caplog) == attempts, "a refused login is being retried"
            await sub.abort()
        again: list[int] = []

        async def collect(ctx: MessageContext[Item]) -> None:
            again.append(ctx.message.n)

        async with msgbroker.connect(with_login(url, user, new), **settings) as broker:
            await broker.subscribe(topic, "g", collect)
            await wait_for(lambda: set(first) | set(again) == set(range(4)) and 1 in again,
                           "every message unsettled at the change delivered again")
            await broker.transport.delete_topic(topic, ["g"])
    finally:
        await rabbitmqctl("delete_user", user)
    assert_no_secret(caplog.text, old, new)
