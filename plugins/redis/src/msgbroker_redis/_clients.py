"""The provider's connections: one Redis server, or a Redis Cluster.

A single server (or a primary behind Sentinel) gets one pooled client. A Redis Cluster gets
redis-py's cluster client, ``RedisCluster``, for every command: it routes each one to the primary
owning its key's slot, follows ``MOVED``/``ASK`` and re-reads the slot map after a failover. Every
key of one topic shares a slot (the ``{topic}`` hash tag), so each script runs on one node.

Two things need one connection on one node, which the cluster client does not promise: the
blocking read (``XREAD BLOCK`` on the connection that ``CLIENT UNBLOCK`` names: :class:`Reader`)
and ``WAIT`` (it waits for the replicas to have the writes *of its own connection*:
:meth:`Connections.replicated`). For those the provider keeps plain clients of single nodes,
found through the cluster client's slot map, and refreshes that map itself when such a node
answers ``MOVED`` or stops answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from msgbroker.spi import (
    BrokerClosedError,
    BrokerConnectionError,
    BrokerTimeoutError,
    ConfigurationError,
    tls_verification_error,
)
from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ._compat import on_reconnect, send_in_one_write, timed_sends
from ._errors import REDIS_ERRORS, redacted, translate, user_of

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["Client", "Connections", "Reader", "node_urls"]

log = logging.getLogger("msgbroker.redis")

Client: TypeAlias = aioredis.Redis | RedisCluster
"""The client every command goes through: a single server's, or the cluster client."""

SOCKET_TIMEOUT = 15.0
"""Seconds a reply may take (a long script, a publish of 4 MiB) before the connection counts as
broken; a node stopped (SIGSTOP) longer than this is given up and, in a cluster, its slots are
looked up again."""
_REDIRECTED = (rex.AskError, rex.TryAgainError, rex.ClusterDownError)
"""Replies of a cluster node that did not run the command (MovedError is an AskError)."""
_STALL = 5.0
"""Seconds past its BLOCK timeout a blocking read may take before its connection counts as stalled."""


def node_urls(url: str) -> list[str]:
    """The URLs of ``redis.url``: one, or several comma-separated (a cluster's start nodes). An
    item without a scheme (``host:port``) takes the first URL's scheme, credentials and options."""
    items = [item.strip() for item in url.split(",") if item.strip()]
    if not items or "://" not in items[0]:
        raise ConfigurationError(f"redis.url={redacted(url)!r} is not a redis URL (redis://host:port)")
    first = urlsplit(items[0])
    userinfo = first.netloc.rpartition("@")[0]
    out = [items[0]]
    for item in items[1:]:
        if "://" in item:
            out.append(item)
        else:
            out.append(urlunsplit(first._replace(netloc=f"{userinfo}@{item}" if userinfo else item)))
    return out


def _at(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced (credentials, database and options kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{address}" if userinfo else address))


class Connections:
    """The clients of one broker connection."""

    def __init__(self, url: str, prefix: str, cluster: bool | None, tls_options: dict[str, Any],
                 max_connections: int = 100) -> None:
        self.urls = node_urls(url)
        self._max_connections = max_connections
        self.cluster = cluster
        """True for a Redis Cluster, False for a single server; None until :meth:`open` asked."""
        self._name = f"msgbroker:{prefix}"  # who is who in CLIENT LIST
        self._tls = tls_options
        self._main: Client | None = None
        self._nodes: dict[tuple[str, int], aioredis.Redis] = {}

    @property
    def main(self) -> Client:
        if self._main is None:
            raise BrokerClosedError("the redis broker connection is closed")
        return self._main

    @property
    def user(self) -> str:
        """The ACL user the connections log in as, for messages."""
        return user_of(self.urls[0])

    def describe(self) -> str:
        """The address for messages, without its password."""
        shown = ",".join(redacted(u) for u in self.urls[:3])
        return shown + (f",... ({len(self.urls)} nodes)" if len(self.urls) > 3 else "")

    def _kwargs(self) -> dict[str, Any]:
        """Every client's options: timeouts, two quick retries of a dropped connection, the name."""
        return {"socket_connect_timeout": 5, "socket_timeout": SOCKET_TIMEOUT,
                "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), 2), "client_name": self._name, **self._tls}

    def plain(self, url: str, *, single: bool = False) -> aioredis.Redis:
        """A client of one server: pooled, or one connection of its own (``single``). The pool
        blocks: a call finding every connection in use waits for one (up to the socket timeout)
        where redis-py's default pool raises "Too many connections" past its 100th."""
        try:
            if single:
                return aioredis.Redis.from_url(url, single_connection_client=True, **self._kwargs())
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=self._max_connections, timeout=SOCKET_TIMEOUT, **self._kwargs())
            pool.connection_class = timed_sends(pool.connection_class)
            return aioredis.Redis.from_pool(pool)
        except ValueError as exc:
            raise ConfigurationError(f"invalid redis url {redacted(url)!r}: {exc}") from exc

    # -- opening ---------------------------------------------------------------------------------

    async def open(self) -> Client:
        """Connect: to a single server, or (``cluster`` True, or the server says it is a cluster
        node) to the Redis Cluster. Errors name the address."""
        if self.cluster is not True:
            client = await self._first_answering()
            enabled = await self._cluster_enabled(client)
            if not enabled:
                if len(self.urls) > 1:
                    await client.aclose()
                    raise ConfigurationError(
                        f"redis.url lists {len(self.urls)} servers, which is for a Redis Cluster's nodes, but "
                        f"{redacted(self.urls[0])} is not a cluster node (cluster_enabled:0): give one url"
                    )
                self.cluster, self._main = False, client
                return client
            await client.aclose()
            if self.cluster is False:
                raise ConfigurationError(
                    f"redis.cluster is false, but {self.describe()} is a Redis Cluster node: set redis.cluster "
                    "to true (or leave it unset)"
                )
        self.cluster = True
        cluster = self._cluster_client()
        try:
            await cluster.initialize()
            await cluster.ping()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await cluster.aclose()
            if isinstance(exc, rex.RedisClusterException) and "not enabled" in str(exc):
                raise ConfigurationError(
                    f"redis.cluster is true, but {self.describe()} is not a Redis Cluster node: {exc}"
                ) from exc
            raise self._cannot_connect(exc) from exc
        self._main = cluster
        return cluster

    def _cluster_client(self) -> RedisCluster:
        startup = []
        for url in self.urls[1:]:
            parts = urlsplit(url)
            if parts.hostname:
                startup.append(ClusterNode(parts.hostname, parts.port or 6379))
        try:
            return RedisCluster.from_url(self.urls[0], startup_nodes=startup or None,
                                         max_connections=self._max_connections, **self._kwargs())
        except (ValueError, rex.RedisClusterException) as exc:
            raise ConfigurationError(f"invalid redis url {self.describe()!r} for a Redis Cluster: {exc}") from exc

    async def _first_answering(self) -> aioredis.Redis:
        """A client of the first URL whose server answers PING (a cluster's first node may be down)."""
        first: BaseException | None = None
        for url in self.urls:
            client = self.plain(url)
            try:
                await client.ping()
                return client
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await client.aclose()
                if not isinstance(exc, Exception):
                    raise
                first = first or exc
                error = translate(exc, "connecting")
                if isinstance(error, ConfigurationError) or tls_verification_error(exc, "redis", redacted(url)):
                    break  # credentials or a certificate: the other nodes would say the same
        assert first is not None
        raise self._cannot_connect(first) from first

    @staticmethod
    async def _cluster_enabled(client: aioredis.Redis) -> bool:
        try:
            info = await client.info("cluster")
        except rex.ResponseError:
            return False  # INFO refused (an ACL, a renamed command): not asked, so a single server
        except REDIS_ERRORS as exc:
            raise translate(exc, "asking the server whether it is a cluster node") from exc
        return str(info.get("cluster_enabled", "0")) == "1"

    def _cannot_connect(self, exc: BaseException) -> Exception:
        where = self.describe()
        untrusted = tls_verification_error(exc, "redis", where)
        if untrusted is not None:
            return untrusted
        error = translate(exc, f"connecting to {where}")
        if isinstance(error, ConfigurationError):
            return error
        return BrokerConnectionError(f"cannot connect to redis at {where}: {exc}")

    async def close(self) -> None:
        clients: list[Any] = [*self._nodes.values()]
        self._nodes.clear()
        main, self._main = self._main, None
        if main is not None:
            clients.append(main)
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- single nodes of a cluster ---------------------------------------------------------------

    def node_of(self, key: str) -> tuple[str, int] | None:
        """The address of the primary that owns ``key``'s slot (None for a single server)."""
        main = self.main
        if not isinstance(main, RedisCluster):
            return None
        try:
            node = main.get_node_from_key(key)
        except rex.RedisClusterException as exc:
            raise translate(exc, f"finding the node of {key!r}") from exc
        if node is None:
            raise translate(rex.SlotNotCoveredError(f"no node owns the slot of {key!r}"), "routing")
        return node.host, int(node.port)

    def node_client(self, address: tuple[str, int] | None) -> aioredis.Redis:
        """The pooled client of one node (None: the single server's client)."""
        if address is None:
            main = self.main
            assert isinstance(main, aioredis.Redis)
            return main
        client = self._nodes.get(address)
        if client is None:
            client = self._nodes[address] = self.plain(_at(self.urls[0], *address))
        return client

    async def refresh(self, key: str) -> None:
        """Have the cluster client look up ``key``'s slot again after one of our own node
        connections met ``MOVED`` or a dead node: a keyed read through it follows the redirect
        (and re-reads the slot map when the node does not answer)."""
        main = self._main
        if isinstance(main, RedisCluster):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(main.exists(key), SOCKET_TIMEOUT)

    # -- WAIT ------------------------------------------------------------------------------------

    async def replicated(self, script: AsyncScript, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
                         replicas: int, timeout: float) -> tuple[list[Any], int]:
        """Run ``script`` for each (keys, args) in ``calls``, then ``WAIT replicas timeout`` on the
        same connection: one pipeline per node (the first key of a call picks it). Returns each
        call's reply or exception, and the fewest replicas that a WAIT saw take the writes (0 when
        a node failed). A call a cluster node redirected did not run; it is routed again, twice
        at most."""
        results: list[Any] = [None] * len(calls)
        confirmed = replicas
        todo = list(range(len(calls)))
        for round_ in range(3):
            groups: dict[tuple[str, int] | None, list[int]] = {}
            for i in todo:
                try:
                    address = self.node_of(str(calls[i][0][0]))
                except Exception as exc:
                    results[i] = exc
                    continue
                groups.setdefault(address, []).append(i)
            outcomes = await asyncio.gather(
                *(self._run_and_wait(self.node_client(a), script, [calls[i] for i in idx], replicas, timeout)
                  for a, idx in groups.items()),
                return_exceptions=True,
            )
            again: list[int] = []
            for idx, outcome in zip(groups.values(), outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if isinstance(outcome, asyncio.CancelledError):
                        raise outcome
                    for i in idx:
                        results[i] = outcome  # the connection failed: each call may or may not have run
                    confirmed = 0
                    await self.refresh(str(calls[idx[0]][0][0]))
                    continue
                replies, waited = outcome
                ran = False
                for i, reply in zip(idx, replies, strict=True):
                    results[i] = reply
                    if isinstance(reply, _REDIRECTED):
                        again.append(i)
                    else:
                        ran = True
                if ran:
                    confirmed = min(confirmed, waited)
            if not again or round_ == 2:
                break
            for key in {str(calls[i][0][0]) for i in again}:
                await self.refresh(key)
            todo = again
        return results, confirmed

    @staticmethod
    async def _run_and_wait(client: aioredis.Redis, script: AsyncScript,
                            calls: list[tuple[Sequence[Any], Sequence[Any]]], replicas: int,
                            timeout: float) -> tuple[list[Any], int]:
        """The calls and a WAIT in one pipeline (one connection); NOSCRIPT loads the script and
        runs those calls again, with another WAIT."""
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        waited = 0
        for _ in range(2):
            pipe = client.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", replicas, max(1, int(timeout * 1000)))
            out = await pipe.execute(raise_on_error=False)
            missing = []
            for i, reply in zip(todo, out[:-1], strict=True):
                results[i] = reply
                if isinstance(reply, rex.NoScriptError):
                    missing.append(i)
            waited = out[-1] if isinstance(out[-1], int) else 0  # an error (a replica, say): nothing confirmed
            if not missing:
                break
            await client.script_load(script.script)
            todo = missing
        return results, waited


def _streams_of(reply: Any) -> set[str]:
    """The stream names of an ``XREAD`` reply (RESP2: ``[[name, entries], ...]``, RESP3: a map)."""
    if not reply:
        return set()
    names = reply.keys() if isinstance(reply, dict) else (item[0] for item in reply)
    return {n.decode() if isinstance(n, bytes) else str(n) for n in names}


class Reader:
    """A consumer's blocking read: ``XREAD BLOCK`` over its lanes on a connection of its own, on
    the node that owns the topic's slot, cut short with ``CLIENT UNBLOCK`` (sent on another
    connection to the same node). On a single server the same connection also runs the
    consumer's read scripts."""

    def __init__(self, connections: Connections, key: str) -> None:
        self._connections = connections
        self._key = key
        self._client: aioredis.Redis | None = None
        self._address: tuple[str, int] | None = None
        self._id: int | None = None
        self._closed = False

    async def open(self) -> None:
        if self._client is not None:
            return
        if self._closed:
            raise BrokerClosedError("the redis reader is closed")
        address = self._connections.node_of(self._key)
        url = self._connections.urls[0] if address is None else _at(self._connections.urls[0], *address)
        client = self._connections.plain(url, single=True)
        try:
            await client.initialize()
        except BaseException as exc:
            # Cancelled too (a consumer stopping while its read connects): the socket is closed
            # here, or nobody would (its owner has let go of the reader by then).
            with contextlib.suppress(Exception):
                await client.aclose()
            if isinstance(exc, REDIS_ERRORS):
                raise translate(exc, f"connecting the reader to {redacted(url)}") from exc
            raise
        if self._closed or self._client is not None:
            # Closed while connecting, or another task of the same reader connected first.
            with contextlib.suppress(Exception):
                await client.aclose()
            if self._closed:
                raise BrokerClosedError("the redis reader is closed")
            return
        # CLIENT UNBLOCK needs the connection's id, which a reconnect changes (and a restarted
        # server hands out again to others): forget it on every reconnect.
        on_reconnect(client, self._reconnected)
        self._client, self._address, self._id = client, address, None

    def _reconnected(self, connection: object) -> None:
        self._id = None

    async def close(self) -> None:
        """Close the connection for good: a read that is connecting meanwhile closes its own."""
        self._closed = True
        await self.drop()

    async def drop(self) -> None:
        """Close the connection; the next use opens one to the node that owns the slot then."""
        client, self._client, self._id = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def script_client(self) -> Client:
        """The client the consumer's read scripts go through: this connection on a single server,
        the cluster client (which follows the slot) in a cluster."""
        if self._address is not None or self._connections.cluster:
            return self._connections.main
        await self.open()
        assert self._client is not None
        return self._client

    async def wait(self, waits: dict[str, bytes], timeout: float, wake: asyncio.Event, doing: str) -> set[str]:
        """Block until one of the streams has an entry after its id, ``timeout`` passes, or
        ``wake`` is set. Returns the streams that have entries (empty: none arrived)."""
        return _streams_of(await self.block(waits, timeout, wake, doing, 1))

    async def block(self, waits: dict[str, bytes], timeout: float, wake: asyncio.Event, doing: str,
                    count: int) -> Any:
        """``XREAD COUNT count BLOCK`` until one of the streams has an entry after its id,
        ``timeout`` passes, or ``wake`` is set: the reply (None or empty: none arrived)."""
        block = max(1, int(timeout * 1000))
        streams: dict[Any, Any] = dict(waits)
        return await self._blocking(lambda client: client.xread(streams, count=count, block=block),
                                    timeout, wake, doing)

    async def block_and_run(self, waits: dict[str, bytes], timeout: float, wake: asyncio.Event, doing: str,
                            count: int, script: AsyncScript, keys: Sequence[Any],
                            args: Sequence[Any]) -> tuple[Any, Any]:
        """:meth:`block` with ``script`` sent in the same write behind it (a single server only):
        Redis runs it as soon as the blocking read returns, for whatever reason. The raw
        replies of both, the script's error as its exception (``NoScriptError``: not run)."""
        command: list[Any] = ["XREAD", "COUNT", count, "BLOCK", max(1, int(timeout * 1000)), "STREAMS", *waits,
                              *waits.values()]
        run = ["EVALSHA", script.sha, len(keys), *keys, *args]

        async def both(client: aioredis.Redis) -> tuple[Any, Any]:
            appended, reply = await send_in_one_write(client, [command, run])
            if isinstance(appended, Exception):
                raise appended
            return appended, reply

        result: tuple[Any, Any] = await self._blocking(both, timeout, wake, doing)
        return result

    async def _blocking(self, call: Callable[[aioredis.Redis], Awaitable[Any]], timeout: float,
                        wake: asyncio.Event, doing: str) -> Any:
        """Run ``call`` (a blocking read of at most ``timeout``) on this connection; ``wake``
        cuts it short with CLIENT UNBLOCK. A reply that does not come within the block time
        and a margin (a stopped node) drops the connection."""
        if self._connections.cluster and self._client is not None:
            if self._connections.node_of(self._key) != self._address:  # a failover moved the slot
                await self.drop()
        await self.open()
        client = self._client
        assert client is not None
        try:
            if self._id is None:
                self._id = int(await client.client_id())
        except REDIS_ERRORS as exc:
            await self.drop()
            raise translate(exc, doing, self._connections.user) from exc
        # The read runs in the caller's task (a task of its own and a wait for it cost a
        # delivery two more turns of a busy event loop); a side task cuts it short when ``wake``
        # is set, and gives the node a second to answer that.
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(timeout + _STALL)
        woken = False

        async def unblock_when_woken() -> None:
            nonlocal woken
            await wake.wait()
            woken = True
            await self._unblock()
            when = deadline.when()
            if when is None or when > loop.time() + 1.0:
                with contextlib.suppress(RuntimeError):  # the read ended meanwhile
                    deadline.reschedule(loop.time() + 1.0)

        waker = asyncio.ensure_future(unblock_when_woken())
        try:
            async with deadline:
                return await call(client)
        except TimeoutError:
            await self.drop()
            if woken:
                return None  # woken while the node does not answer: the next poll finds out
            raise BrokerTimeoutError(
                f"redis: {doing}: no reply within {timeout + _STALL:.1f}s (node stopped?)") from None
        except REDIS_ERRORS as exc:
            await self.drop()
            raise translate(exc, doing, self._connections.user) from exc
        finally:
            waker.cancel()

    async def _unblock(self) -> None:
        if self._id is None:
            return
        try:
            client = self._connections.node_client(self._address)
            if not await asyncio.wait_for(client.client_unblock(self._id), 1.0):
                self._id = None  # reconnected since: learn the new id next time
        except (TimeoutError, *REDIS_ERRORS):
            pass
