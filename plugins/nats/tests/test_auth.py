"""The NATS provider against ``scripts/brokers up nats-auth``: a nats-server that demands
credentials, with an account per tenant (``TENANT_A``, ``TENANT_B``, JetStream enabled in each)
whose user ``tenant-a``/``tenant-b`` may publish and subscribe only to the subjects the provider
uses for its stream prefix (docs/security.md). The contract suite as tenant A, refused
credentials, missing permissions, a permission revoked mid-stream, tenants kept apart.

Permissions are taken away by editing the tenant's line of ``.brokers/nats-auth/nats-auth.conf``
and sending the server SIGHUP (a config reload), and given back the same way; ``scripts/brokers
restart nats-auth`` writes the config anew in any case."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import msgbroker
import nats
import pytest
from msgbroker import AccessDeniedError, Message, MessageContext
from msgbroker.testing import eventually
from msgbroker_conformance import ConformanceHarness, ConformanceSuite

REPO = Path(__file__).resolve().parents[3]
SERVER_DIR = REPO / ".brokers" / "nats-auth"
HOW = "run `scripts/brokers up nats-auth` and load its settings (`set -a; . .brokers/env; set +a`)"


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
    """Tenant A of the authenticated server: its URL (user and password) and its stream prefix,
    otherwise as test_conformance.NatsHarness (tests run with --import-mode=importlib, so that
    module cannot be imported from here). Every case uses the tenant's one prefix (its
    permissions name no other; the cases' topic and group names are unique anyway)."""

    url = os.environ.get("MSGBROKER_TEST_NATS_AUTH_URL_A") or None
    url_env = "MSGBROKER_TEST_NATS_AUTH_URL_A"
    timeout_multiplier = 1.0
    prefix: ClassVar[str] = os.environ.get("MSGBROKER_TEST_NATS_AUTH_PREFIX_A", "")

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"nats": {"stream_prefix": self.prefix, "ack_wait": 2}}

    def describe(self) -> str:
        return f"{type(self).__name__}({redacted(self.url) if self.url else 'no url'})"

    async def restart_server(self) -> None:
        """Restart the authenticated server through the broker script (its accounts and users come
        back from the config it writes; streams are file-backed), returning once it answers."""
        process = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "brokers"), "restart", "nats-auth",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"scripts/brokers restart nats-auth failed ({process.returncode}): "
                               f"{output.decode()[-2000:]}")


class TestConformanceAsTenant(ConformanceSuite):
    """The contract holds for a user with only the permissions docs/security.md lists."""

    harness = TenantHarness()


@pytest.fixture(scope="module", autouse=True)
def _remove_the_streams() -> Iterator[None]:
    """Delete every stream of both accounts afterwards, as their admins (tenants may not)."""
    yield
    with contextlib.suppress(Exception):
        asyncio.run(_delete_all_streams())


async def _delete_all_streams() -> None:
    for letter in ("A", "B"):
        url = os.environ.get(f"MSGBROKER_TEST_NATS_AUTH_ADMIN_URL_{letter}", "").strip()
        if not url:
            continue
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=1)
        try:
            jsm = nc.jsm()
            names: list[str] = []
            while True:
                page = await jsm.streams_info(offset=len(names))
                if not page:
                    break
                names += [info.config.name for info in page]
            for name in names:
                with contextlib.suppress(Exception):
                    await jsm.delete_stream(name)
        finally:
            await nc.close()


# -- helpers ------------------------------------------------------------------------------------


class Item(Message):
    n: int

    @property
    def partition_key(self) -> str:
        return "k"


def tenant(letter: str) -> tuple[str, str]:
    """(url with user and password, stream prefix) of tenant ``letter``."""
    return setting(f"MSGBROKER_TEST_NATS_AUTH_URL_{letter}"), setting(f"MSGBROKER_TEST_NATS_AUTH_PREFIX_{letter}")


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


def all_secrets() -> list[str]:
    return [secret_of(tenant(letter)[0]) for letter in ("A", "B")]


async def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    await eventually(check, timeout=timeout, what=what, interval=0.05)


def _without(line: str, subject: str) -> str:
    """A user's config line without ``subject`` in its permission lists."""
    quoted = json.dumps(subject)
    for form in (f"{quoted}, ", f", {quoted}", quoted):
        if form in line:
            return line.replace(form, "", 1)
    raise AssertionError(f"{subject} is not in the line {line[:60]}...")


async def _reload(text: str) -> None:
    """Write the server's config and make it reload it (SIGHUP); back once its log says so."""
    conf, log = SERVER_DIR / "nats-auth.conf", SERVER_DIR / "nats-auth.log"
    if not conf.exists():
        pytest.fail(f"{conf} is missing: {HOW}", pytrace=False)
    start = log.stat().st_size
    conf.write_text(text)  # the file keeps its mode (0600)
    pid = int(json.loads((SERVER_DIR / "pid").read_text())["pid"])
    os.kill(pid, signal.SIGHUP)

    def reloaded() -> bool:
        with log.open("rb") as f:
            f.seek(start)
            seen = f.read().decode(errors="replace")
        if "Failed to reload" in seen:
            pytest.fail(f"nats-auth could not reload its config: {seen[-1000:]}")
        return "Reloaded server configuration" in seen

    await wait_for(reloaded, "nats-auth to reload its config")


@contextlib.asynccontextmanager
async def revoked(user: str, *subjects: str) -> AsyncIterator[None]:
    """The server without ``subjects`` in ``user``'s permissions, given back afterwards."""
    conf = SERVER_DIR / "nats-auth.conf"
    original = conf.read_text()
    lines = original.splitlines(keepends=True)
    edited = []
    for line in lines:
        if f'user: "{user}"' in line:
            for subject in subjects:
                line = _without(line, subject)
        edited.append(line)
    assert edited != lines, f"no line of {user} in {conf}"
    await _reload("".join(edited))
    try:
        yield
    finally:
        await _reload(original)


# -- refused credentials ------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["wrong password", "unknown user"])
async def test_refused_credentials_end_in_one_clear_error(who: str, caplog: pytest.LogCaptureFixture) -> None:
    url, prefix = tenant("A")
    wrong = f"not-{secret_of(url)}"
    user = "tenant-a" if who == "wrong password" else f"nobody-{uuid.uuid4().hex[:6]}"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AccessDeniedError) as caught:
        async with msgbroker.connect(with_login(url, user, wrong), nats={"stream_prefix": prefix}) as broker:
            await broker.publish("t", Item(n=1))
    text = str(caught.value)
    assert text.startswith("nats: connecting to") and "refused the credentials" in text, text
    assert "Authorization Violation" in text, text
    assert f"user {user!r}" in text and f"{user}:***@" in text, f"the message does not name the user: {text}"
    assert_no_secret(text + "\n" + caplog.text, wrong, *all_secrets())


# -- a missing permission -----------------------------------------------------------------------


MISSING = {
    # what the tenant does: (the subject taken from its permissions, the operation named)
    "publish": ("tenant-a.>", "publishing to"),
    "subscribe": ("$JS.API.CONSUMER.DURABLE.CREATE.*.*", "creating consumer"),
    "connect": ("_INBOX.>", "checking JetStream on"),
}


@pytest.mark.parametrize("doing", list(MISSING))
async def test_a_missing_permission_ends_in_access_denied(doing: str, caplog: pytest.LogCaptureFixture) -> None:
    """Without one of the permissions docs/security.md lists, the operation that needs it ends in
    AccessDeniedError at once (not a timeout), naming the user, the subject and the operation."""
    url, prefix = tenant("A")
    subject, operation = MISSING[doing]
    topic = f"t-{uuid.uuid4().hex[:8]}"
    settings: dict[str, Any] = {"nats": {"stream_prefix": prefix, "ack_wait": 2}, "partition_count": 1}
    caplog.set_level(logging.DEBUG)

    async def handle(ctx: MessageContext[Item]) -> None:
        return None

    async with revoked("tenant-a", subject):
        with pytest.raises(AccessDeniedError) as caught:
            async with msgbroker.connect(url, **settings) as broker:
                if doing == "publish":
                    await broker.publish(topic, Item(n=1))
                elif doing == "subscribe":
                    await broker.subscribe(topic, "g", handle)
    text = str(caught.value)
    verb = "subscribe" if subject == "_INBOX.>" else "publish"
    assert text.startswith("nats: ") and operation in text, text
    assert f"user 'tenant-a' may not {verb} to" in text and "Permissions Violation" in text, text
    assert "docs/security.md" in text, text
    assert_no_secret(text + "\n" + caplog.text, *all_secrets())


# -- a permission revoked mid-stream ------------------------------------------------------------


def one_lane(prefix: str) -> dict[str, Any]:
    """Settings of a topic with one lane under ``prefix``: ack_wait 2 s, shutdown 2 s."""
    return {"nats": {"stream_prefix": prefix, "ack_wait": 2}, "partition_count": 1, "shutdown_timeout": 2}


class Holder:
    """A handler that records each message and keeps the one numbered ``at`` until ``gate`` is set."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen: list[int] = []
        self.gate = asyncio.Event()

    async def __call__(self, ctx: MessageContext[Item]) -> None:
        self.seen.append(ctx.message.n)
        if ctx.message.n == self.at:
            await self.gate.wait()


async def handled_again(url: str, prefix: str, topic: str, first: list[int], count: int, held: int) -> None:
    """Another member gets every message of ``topic`` the first one did not settle, ``held`` again."""
    again: list[int] = []

    async def collect(ctx: MessageContext[Item]) -> None:
        again.append(ctx.message.n)

    async with msgbroker.connect(url, **one_lane(prefix)) as broker:
        await broker.subscribe(topic, "g", collect)
        await wait_for(lambda: set(first) | set(again) == set(range(count)) and held in again,
                       "every message unsettled at the refusal delivered again")


async def test_a_permission_revoked_mid_stream_is_reported_and_loses_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """The acks' permission taken away (config reload) while a handler runs: the subscription
    stops by itself with AccessDeniedError (no endless retry), like a crash; once the permission
    is back, another member gets every message that was not settled."""
    url, prefix = tenant("A")
    topic = f"rv-{uuid.uuid4().hex[:8]}"
    handler = Holder(at=2)
    caplog.set_level(logging.WARNING)
    async with msgbroker.connect(url, **one_lane(prefix)) as broker:
        await broker.publish_batch(topic, [Item(n=i) for i in range(5)])
        sub = await broker.subscribe(topic, "g", handler)
        await wait_for(lambda: 2 in handler.seen, "message 2 in its handler")
        async with revoked("tenant-a", "$JS.ACK.>"):
            handler.gate.set()
            await wait_for(lambda: sub.failure is not None, "the subscription to stop on the refused permission")
            assert isinstance(sub.failure, AccessDeniedError), sub.failure
            text = str(sub.failure)
            assert text.startswith("nats: pulling from"), text
            assert "user 'tenant-a' may not publish to '$js.ack." in text, text
            assert "Permissions Violation" in text, text
            stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
            assert stopped and "tenant-a" in stopped[0], caplog.text
            await sub.abort()
    await handled_again(url, prefix, topic, handler.seen, 5, held=2)
    reports = [r.getMessage() for r in caplog.records if "Permissions Violation" in r.getMessage()]
    assert reports and all("tenant-a" in r and "nats" in r for r in reports), reports[:3]
    assert_no_secret(caplog.text, *all_secrets())


async def test_a_password_changed_mid_stream_stops_the_subscription(caplog: pytest.LogCaptureFixture) -> None:
    """The user's password changed in the config and reloaded: the server closes its connection
    (Authorization Violation); the subscription stops with AccessDeniedError instead of retrying,
    and what it held comes back once the old password is valid again."""
    url, prefix = tenant("A")
    topic = f"pw-{uuid.uuid4().hex[:8]}"
    handler = Holder(at=0)
    caplog.set_level(logging.WARNING)
    original = (SERVER_DIR / "nats-auth.conf").read_text()
    password = secret_of(url)
    changed = "".join(line.replace(json.dumps(password), json.dumps(f"new-{password}"))
                      if 'user: "tenant-a"' in line else line for line in original.splitlines(keepends=True))
    async with msgbroker.connect(url, **one_lane(prefix)) as broker:
        await broker.publish_batch(topic, [Item(n=i) for i in range(3)])
        sub = await broker.subscribe(topic, "g", handler)
        await wait_for(lambda: handler.seen == [0], "message 0 in its handler")
        await _reload(changed)
        try:
            await wait_for(lambda: sub.failure is not None, "the subscription to stop on the refused credentials")
        finally:
            await _reload(original)
        handler.gate.set()
        assert isinstance(sub.failure, AccessDeniedError), sub.failure
        text = str(sub.failure)
        assert "refused the credentials of user 'tenant-a'" in text and "Authorization Violation" in text, text
        await sub.abort()
    await handled_again(url, prefix, topic, handler.seen, 3, held=0)
    assert_no_secret(caplog.text, f"new-{password}", *all_secrets())


# -- tenants kept apart -------------------------------------------------------------------------


@pytest.mark.parametrize(("me", "other"), [("A", "B"), ("B", "A")])
async def test_a_tenant_cannot_publish_read_or_list_the_dead_letters_of_another(
        me: str, other: str, caplog: pytest.LogCaptureFixture) -> None:
    """Tenant ``me`` with the other's stream prefix: its publish and its subscription end in
    AccessDeniedError (its permissions name only its own prefix's subjects and KV buckets), and
    its dead-letter listing finds nothing, since its account has none of the other's streams."""
    url_me, _ = tenant(me)
    url_other, prefix_other = tenant(other)
    user_me = f"tenant-{me.lower()}"
    topic = f"iso-{uuid.uuid4().hex[:8]}"
    handled: list[int] = []
    caplog.set_level(logging.DEBUG)

    async def reject(ctx: MessageContext[Item]) -> None:
        handled.append(ctx.message.n)
        await ctx.nak(requeue=False)

    theirs: dict[str, Any] = {"nats": {"stream_prefix": prefix_other, "ack_wait": 2}, "partition_count": 1}
    # The other tenant has a message in its dead letters: there is something to steal.
    async with msgbroker.connect(url_other, **theirs) as owner:
        await owner.publish(topic, Item(n=1))
        await owner.subscribe(topic, "g", reject)
        await wait_for(lambda: owner.dead_letters(topic, "g"), "the other tenant's dead letter")
        attempts: dict[str, Callable[[msgbroker.Broker], Any]] = {
            "publishing to": lambda b: b.publish(topic, Item(n=2)),
            "beating for": lambda b: b.subscribe(topic, "g", reject),
        }
        for operation, attempt in attempts.items():
            async with msgbroker.connect(url_me, **theirs) as intruder:
                with pytest.raises(AccessDeniedError) as caught:
                    await attempt(intruder)
            text = str(caught.value)
            assert operation in text and f"user {user_me!r} may not publish to" in text, (operation, text)
            assert "Permissions Violation" in text, text
        async with msgbroker.connect(url_me, **theirs) as intruder:
            assert await intruder.dead_letters(topic, "g") == [], "a tenant listed another's dead letters"
        assert handled == [1], "the intruder's publish or read reached the other tenant's topic"
        [letter] = await owner.dead_letters(topic, "g")
        assert letter.message_id
    assert_no_secret(caplog.text, *all_secrets())


# -- the documented permissions are the server's --------------------------------------------------


def documented_block() -> str:
    doc = (REPO / "docs" / "security.md").read_text()
    section = doc.split("## NATS", 1)[1].split("\n## ", 1)[0]
    return section.split("```text", 1)[1].split("```", 1)[0]


def test_the_documented_permissions_are_the_ones_the_server_grants() -> None:
    """docs/security.md's NATS permissions list exactly the subjects the nats-auth server grants a
    tenant (scripts/msgbroker_servers/nats_auth_server.py), which the suite above runs with."""
    server = (REPO / "scripts" / "msgbroker_servers" / "nats_auth_server.py").read_text()

    def granted(name: str) -> list[str]:
        block = server.split(f"{name} = (", 1)[1].split("\n)", 1)[0]
        return [s.replace("{p}", "orders") for s in re.findall(r'^\s*"([^"]+)",', block, re.MULTILINE)]

    doc = documented_block()
    publish = doc.split("publish", 1)[1].split("subscribe", 1)[0]
    subscribe = doc.split("subscribe", 1)[1]
    assert re.findall(r'"([^"]+)"', publish) == granted("TENANT_PUBLISH"), publish
    assert re.findall(r'"([^"]+)"', subscribe) == granted("TENANT_SUBSCRIBE"), subscribe


# -- NKey users -----------------------------------------------------------------------------------


def nkey_of(letter: str) -> tuple[str, str, str]:
    """(public key, seed file, seed) of tenant ``letter``'s NKey user (same account, prefix and
    permissions as its password user)."""
    path = setting(f"MSGBROKER_TEST_NATS_AUTH_NKEY_SEED_FILE_{letter}")
    return setting(f"MSGBROKER_TEST_NATS_AUTH_NKEY_{letter}"), path, Path(path).read_text().strip()


@pytest.mark.parametrize("how", ["nkeys_seed", "nkeys_seed_file"])
async def test_an_nkey_user_logs_in_and_keeps_to_its_permissions(how: str, caplog: pytest.LogCaptureFixture) -> None:
    """Tenant A's NKey user, by its seed or its seed file: publishes and reads its own topics, and
    is refused another tenant's like the password user; the seed is in no output."""
    address = setting("MSGBROKER_TEST_NATS_AUTH_ADDRESS")
    _, prefix = tenant("A")
    public, path, seed = nkey_of("A")
    login = {how: seed if how == "nkeys_seed" else path}
    topic = f"nk-{uuid.uuid4().hex[:8]}"
    got: list[int] = []

    async def collect(ctx: MessageContext[Item]) -> None:
        got.append(ctx.message.n)

    caplog.set_level(logging.DEBUG)
    async with msgbroker.connect(address, nats={"stream_prefix": prefix, "ack_wait": 2, **login},
                                 partition_count=1) as broker:
        await broker.publish(topic, Item(n=1))
        await broker.subscribe(topic, "g", collect)
        await wait_for(lambda: got == [1], "the message read by the NKey user")
        shown = f"{broker!r} {broker.settings!r} {broker.settings.nats!r}"
    _, other_prefix = tenant("B")
    async with msgbroker.connect(address, nats={"stream_prefix": other_prefix, **login}, partition_count=1) as other:
        with pytest.raises(AccessDeniedError) as caught:
            await other.publish(topic, Item(n=2))
    text = str(caught.value)
    assert f"nkey user '{public}' may not publish to '{other_prefix}." in text, text
    assert_no_secret(shown + "\n" + text + "\n" + caplog.text, seed, *all_secrets())


async def test_an_unknown_nkey_is_refused_in_one_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    import nkeys  # type: ignore[import-untyped]

    address = setting("MSGBROKER_TEST_NATS_AUTH_ADDRESS")
    _, prefix = tenant("A")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AccessDeniedError) as caught:
        async with msgbroker.connect(address, nats={"stream_prefix": prefix, "nkeys_seed": seed}) as broker:
            await broker.publish("t", Item(n=1))
    text = str(caught.value)
    assert f"the server refused the credentials of nkey user '{public}'" in text, text
    assert "Authorization Violation: an nkey the server does not know" in text, text
    assert_no_secret(text + "\n" + caplog.text, seed)


def test_a_seed_that_is_not_one_is_refused_without_being_shown() -> None:
    secret = "SUnot-a-seed-" + uuid.uuid4().hex
    for settings in ({"nkeys_seed": secret}, {"nkeys_seed": 12345678}):
        with pytest.raises(msgbroker.ConfigurationError) as caught:
            msgbroker.connect("nats://127.0.0.1:4224", nats=settings)
            asyncio.run(msgbroker.connect("nats://127.0.0.1:4224", nats=settings).open())
        assert secret not in str(caught.value) and "12345678" not in str(caught.value), caught.value
        assert "nkeys_seed" in str(caught.value), caught.value
