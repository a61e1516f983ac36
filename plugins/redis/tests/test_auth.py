"""The Redis provider against ``scripts/brokers up redis-auth``: a server that demands
credentials, the default user disabled, tenants ``tenant-a`` and ``tenant-b`` each limited to
its own key prefix and the commands the provider sends (docs/security.md). The whole contract
suite as tenant A, refused credentials, a permission revoked mid-stream, tenants kept apart."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import msgbroker
import pytest
import redis.asyncio as aioredis
from msgbroker import AccessDeniedError, ConfigurationError, Message, MessageContext
from msgbroker_conformance import ConformanceHarness, ConformanceSuite

REPO = Path(__file__).resolve().parents[3]
HOW = "run `scripts/brokers up redis-auth` and load its settings (`set -a; . .brokers/env; set +a`)"


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


class TenantHarness(ConformanceHarness):
    """Tenant A of the authenticated server: its URL (user and password) and its key prefix,
    otherwise as test_conformance.RedisHarness (tests run with --import-mode=importlib, so that
    module cannot be imported from here)."""

    url = os.environ.get("MSGBROKER_TEST_REDIS_AUTH_URL_A") or None
    url_env = "MSGBROKER_TEST_REDIS_AUTH_URL_A"
    timeout_multiplier = 1.0
    prefix: ClassVar[str] = os.environ.get("MSGBROKER_TEST_REDIS_AUTH_PREFIX_A", "")

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"redis": {"key_prefix": f"{self.prefix}:c-{namespace}", "claim_timeout": 2}}

    def describe(self) -> str:
        return f"{type(self).__name__}({redacted(self.url) if self.url else 'no url'})"


    async def restart_server(self) -> None:
        """Restart the authenticated server through the broker script (its users come back from
        its aclfile), returning once it answers again."""
        process = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "brokers"), "restart", "redis-auth",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"scripts/brokers restart redis-auth failed ({process.returncode}): "
                               f"{output.decode()[-2000:]}")


class TestConformanceAsTenant(ConformanceSuite):
    """The contract holds for a user with only the permissions docs/security.md lists."""

    harness = TenantHarness()


# -- refused credentials ------------------------------------------------------------------------


class Item(Message):
    n: int

    @property
    def partition_key(self) -> str:
        return "k"


def tenant(letter: str) -> tuple[str, str]:
    """(url with user and password, key prefix) of tenant ``letter``."""
    return (setting(f"MSGBROKER_TEST_REDIS_AUTH_URL_{letter}"), setting(f"MSGBROKER_TEST_REDIS_AUTH_PREFIX_{letter}"))


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


@pytest.mark.parametrize("who", ["wrong password", "unknown user"])
async def test_refused_credentials_end_in_one_clear_error(who: str, caplog: pytest.LogCaptureFixture) -> None:
    url, prefix = tenant("A")
    wrong = f"not-{secret_of(url)}"
    user = "tenant-a" if who == "wrong password" else f"nobody-{uuid.uuid4().hex[:6]}"
    bad = with_login(url, user, wrong)
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(AccessDeniedError) as caught:
        async with msgbroker.connect(bad, redis={"key_prefix": prefix}) as broker:
            await broker.publish("t", Item(n=1))
    assert time.monotonic() - started < 10, "refused credentials took a retry loop or a timeout to report"
    text = str(caught.value)
    assert "redis" in text and "connecting" in text and "refused the credentials" in text, text
    assert f"{user}:***@" in text, f"the message does not name the user: {text}"
    assert_no_secret(text + "\n" + caplog.text, wrong, secret_of(url))


# -- tenants kept apart -------------------------------------------------------------------------


async def test_a_tenant_cannot_publish_read_or_list_the_dead_letters_of_another() -> None:
    url_a, _ = tenant("A")
    url_b, prefix_b = tenant("B")
    topic = f"t-{uuid.uuid4().hex[:8]}"
    space = f"{prefix_b}:iso-{uuid.uuid4().hex[:6]}"
    handled: list[int] = []

    async def reject(ctx: MessageContext[Item]) -> None:
        handled.append(ctx.message.n)
        await ctx.nak(requeue=False)

    # B has a message in its dead letters: there is something to steal.
    async with msgbroker.connect(url_b, redis={"key_prefix": space, "claim_timeout": 2}, partition_count=1) as b:
        await b.publish(topic, Item(n=1))
        await b.subscribe(topic, "g", reject)
        await wait_for(lambda: b.dead_letters(topic, "g"), "B's dead letter")
        async with msgbroker.connect(url_a, redis={"key_prefix": space}, partition_count=1) as a:
            for what, attempt in (("publish", lambda: a.publish(topic, Item(n=2))),
                                  ("read", lambda: a.subscribe(topic, "g", reject)),
                                  ("list the dead letters", lambda: a.dead_letters(topic, "g"))):
                with pytest.raises(AccessDeniedError) as caught:
                    await attempt()
                text = str(caught.value)
                assert "user 'tenant-a' has no permission" in text and "NOPERM" in text, (what, text)
        assert handled == [1], "A's publish or read reached B's topic"
        [letter] = await b.dead_letters(topic, "g")
        assert letter.message_id
    await admin_cleanup(space)


# -- a permission revoked mid-stream ------------------------------------------------------------


async def test_a_permission_revoked_mid_stream_is_reported_and_loses_nothing(caplog: pytest.LogCaptureFixture) -> None:
    url, prefix = tenant("A")
    admin = aioredis.Redis.from_url(setting("MSGBROKER_TEST_REDIS_AUTH_ADMIN_URL"), socket_timeout=10)
    space = f"{prefix}:rv-{uuid.uuid4().hex[:6]}"
    topic = "t"
    settings: dict[str, Any] = {"redis": {"key_prefix": space, "claim_timeout": 2}, "partition_count": 1,
                                "shutdown_timeout": 2}
    first: list[int] = []
    gate = asyncio.Event()

    async def hold_at_two(ctx: MessageContext[Item]) -> None:
        first.append(ctx.message.n)
        if ctx.message.n == 2:
            await gate.wait()

    caplog.set_level(logging.WARNING)
    try:
        async with msgbroker.connect(url, **settings) as broker:
            await broker.publish_batch(topic, [Item(n=i) for i in range(5)])
            sub = await broker.subscribe(topic, "g", hold_at_two)
            await wait_for(lambda: 2 in first, "message 2 in its handler")
            await admin.execute_command("ACL", "SETUSER", "tenant-a", "resetkeys")  # every key refused now
            gate.set()
            # The subscription stops by itself with the refusal (no endless retry), like a crash.
            await wait_for(lambda: sub.failure is not None, "the subscription to stop on the refused permission")
            assert isinstance(sub.failure, AccessDeniedError), sub.failure
            assert "tenant-a" in str(sub.failure) and "redis" in str(sub.failure), sub.failure
            stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
            assert stopped and "tenant-a" in stopped[0], caplog.text
            await sub.abort()
        await admin.execute_command("ACL", "SETUSER", "tenant-a", "resetkeys", f"~{prefix}:*")
        again: list[int] = []

        async def collect(ctx: MessageContext[Item]) -> None:
            again.append(ctx.message.n)

        async with msgbroker.connect(url, **settings) as broker:
            await broker.subscribe(topic, "g", collect)
            await wait_for(lambda: set(first) | set(again) == set(range(5)) and 2 in again,
                           "every message unsettled at the revocation delivered again")
    finally:
        await admin.execute_command("ACL", "SETUSER", "tenant-a", "resetkeys", f"~{prefix}:*")
        await admin_cleanup(space)
        await admin.aclose()
    reports = [r.getMessage() for r in caplog.records if "NOPERM" in r.getMessage()]
    assert reports and all("tenant-a" in r and "redis" in r for r in reports), reports[:3]
    assert_no_secret(caplog.text, secret_of(url))


# -- helpers ------------------------------------------------------------------------------------


async def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
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


async def admin_cleanup(space: str) -> None:
    """Delete every key under ``space`` as the admin (no tenant may scan)."""
    admin = aioredis.Redis.from_url(setting("MSGBROKER_TEST_REDIS_AUTH_ADMIN_URL"), socket_timeout=10)
    try:
        async for key in admin.scan_iter(match=f"{space}:*", count=1000):
            await admin.delete(key)
    finally:
        await admin.aclose()


def test_the_documented_acl_rule_is_the_one_the_server_runs() -> None:
    """docs/security.md's rule lists exactly the commands the redis-auth server grants a tenant
    (scripts/msgbroker_servers/redis_auth_server.py), which the suite above runs with."""
    server = (REPO / "scripts" / "msgbroker_servers" / "redis_auth_server.py").read_text()
    granted = server.split("TENANT_COMMANDS = (", 1)[1].split(")", 1)[0]
    documented = documented_commands()
    assert set(documented) == set(re.findall(r'"(\+[a-z|@]+)"', granted)), documented
    assert "resetkeys ~orders:* resetchannels -@all" in documented_rule()


def documented_rule() -> str:
    doc = (REPO / "docs" / "security.md").read_text()
    return doc.split("### The ACL rule a service user needs", 1)[1].split("```text", 1)[1].split("```", 1)[0]


def documented_commands() -> list[str]:
    """The commands of docs/security.md's ACL rule (``+ping``, ``+client|id``...)."""
    return re.findall(r"\+[a-z|@]+", documented_rule())


async def test_a_password_is_rotated_without_downtime() -> None:
    """docs/security.md's rotation: a second password, then the old one removed; a broker that is
    open meanwhile keeps working."""
    url, prefix = tenant("A")
    admin = aioredis.Redis.from_url(setting("MSGBROKER_TEST_REDIS_AUTH_ADMIN_URL"), socket_timeout=10)
    user, old, new = f"rot-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex, uuid.uuid4().hex
    rule = documented_commands()  # the same as the server's tenants (test above)
    space = f"{prefix}:rot-{uuid.uuid4().hex[:6]}"
    settings: dict[str, Any] = {"redis": {"key_prefix": space}, "partition_count": 1}
    try:
        await admin.execute_command("ACL", "SETUSER", user, "on", f">{old}", "resetkeys", f"~{prefix}:*",
                                    "resetchannels", "-@all", *rule)
        async with msgbroker.connect(with_login(url, user, old), **settings) as running:
            await running.publish("t", Item(n=1))
            await admin.execute_command("ACL", "SETUSER", user, f">{new}")
            for password in (old, new):
                async with msgbroker.connect(with_login(url, user, password), **settings) as broker:
                    await broker.publish("t", Item(n=2))
            await admin.execute_command("ACL", "SETUSER", user, f"<{old}")
            with pytest.raises(ConfigurationError, match="refused the credentials"):
                async with msgbroker.connect(with_login(url, user, old), **settings) as broker:
                    await broker.publish("t", Item(n=3))
            async with msgbroker.connect(with_login(url, user, new), **settings) as broker:
                await broker.publish("t", Item(n=4))
            await running.publish("t", Item(n=5))  # its connection stays logged in
            assert await running.pending_count("t", "g") == 5, "a publish during the rotation was lost"
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin_cleanup(space)
        await admin.aclose()


async def test_credentials_over_tls() -> None:
    """The same user over the server's TLS port: accepted with its password, refused without."""
    url, prefix = tenant("A")
    address = urlsplit(setting("MSGBROKER_TEST_REDIS_AUTH_TLS_ADDRESS"))
    tls_url = with_login(urlunsplit(address), "tenant-a", secret_of(url))
    space = f"{prefix}:tls-{uuid.uuid4().hex[:6]}"
    redis = {"key_prefix": space, "ssl_cafile": setting("MSGBROKER_TEST_TLS_CA_FILE")}
    try:
        async with msgbroker.connect(tls_url, redis=redis, partition_count=1) as broker:
            await broker.publish("t", Item(n=1))
            assert await broker.pending_count("t", "g") == 1
        with pytest.raises(ConfigurationError, match="refused the credentials") as caught:
            async with msgbroker.connect(with_login(tls_url, "tenant-a", "wrong"), redis=redis) as broker:
                await broker.publish("t", Item(n=2))
        assert_no_secret(str(caught.value), secret_of(url))
    finally:
        await admin_cleanup(space)
