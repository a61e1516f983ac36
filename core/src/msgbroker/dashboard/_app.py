"""The dashboard's server: a sampler that reads ``Transport.describe`` for every watched group
once per interval (and keeps the rates), and a Starlette app serving the page, its JSON API and
— when started with ``allow_changes`` — replay and purge of dead letters.

Safety (docs/dashboard.md, "Safety"): every request needs the access token when one is set
(required off loopback); on loopback the Host header must name loopback (no DNS rebinding);
a mutating request must be a same-origin JSON POST carrying the page's CSRF token; the page
renders everything as text (its JavaScript never parses markup) under a strict CSP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._broker import Broker
from .._describe import GroupView
from .._errors import CapabilityNotSupported, MsgBrokerError
from .._message import DeadLetter

log = logging.getLogger("msgbroker.dashboard")

COOKIE = "msgbroker_dashboard"
"""The cookie that carries the access token after ``/?token=...`` (HttpOnly, SameSite=Strict)."""
CSRF_HEADER = "x-msgbroker-csrf"
HISTORY = 120
"""Samples of rates kept per group (two minutes at the default interval)."""
REPLAY_CHUNK = 100
"""Dead letters per replay round trip (as ``msgbroker dlq replay``)."""
DEAD_LETTER_PAGE = 500
"""The most dead letters one list answer carries (the total is said)."""

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class DashboardConfig:
    """How the dashboard runs (the command's options)."""

    watch: Sequence[tuple[str, str]] = ()
    """The (topic, group) pairs to show; none: every group the provider lists (``Transport.topics``)."""
    allow_changes: bool = False
    """Replay and purge are refused (403) unless this is set."""
    token: str | None = None
    """Access token every request must carry (cookie, ``Authorization: Bearer`` or ``?token=``)."""
    host: str = "127.0.0.1"
    interval: float = 1.0
    """Seconds between two samples."""
    where: str = ""
    """The broker, without credentials, as shown on the page."""
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))


@dataclass
class _Sample:
    at: float
    published: int | None
    pending: int
    dead: int


@dataclass
class _Watched:
    topic: str
    group: str
    view: GroupView | None = None
    error: str | None = None
    samples: deque[_Sample] = field(default_factory=lambda: deque(maxlen=2))
    rates: deque[dict[str, float | None]] = field(default_factory=lambda: deque(maxlen=HISTORY))


class Sampler:
    """Reads every watched group once per interval; keeps views, rates and broker health."""

    def __init__(self, broker: Broker, config: DashboardConfig) -> None:
        self.broker = broker
        self.config = config
        self.groups: dict[tuple[str, str], _Watched] = {}
        self.healthy: bool | None = None
        self.latency: float | None = None
        self.checked_at: float | None = None
        self.listing: str | None = None
        """Why the provider's topics could not be listed, if they could not."""
        self.rounds = 0
        self.stopped = False
        """Set when the app shuts down: the loop ends even if a client library swallowed the
        cancellation of the round in hand (Python 3.11's ``wait_for`` can)."""
        for topic, group in config.watch:
            self.groups[(topic, group)] = _Watched(topic, group)

    async def run(self) -> None:
        while not self.stopped:
            started = time.monotonic()
            await self.sample()
            await asyncio.sleep(max(0.05, self.config.interval - (time.monotonic() - started)))

    async def sample(self) -> None:
        t0 = time.monotonic()
        self.healthy = await self.broker.is_healthy()
        self.latency = time.monotonic() - t0
        self.checked_at = time.time()
        if self.healthy:
            if not self.config.watch:
                await self._discover()
            await asyncio.gather(*(self._read(w) for w in list(self.groups.values())))
        self.rounds += 1

    async def _discover(self) -> None:
        try:
            listed = await self.broker.transport.topics()
        except CapabilityNotSupported as exc:
            self.listing = str(exc)
            return
        except (MsgBrokerError, OSError) as exc:
            self.listing = f"listing topics failed: {exc}"
            return
        self.listing = None
        for topic, groups in listed.items():
            for group in groups:
                self.groups.setdefault((topic, group), _Watched(topic, group))

    async def _read(self, watched: _Watched) -> None:
        try:
            view = await self.broker.transport.describe(watched.topic, watched.group)
        except Exception as exc:  # shown on the page; the next round tries again
            watched.error = f"{type(exc).__name__}: {exc}"
            return
        watched.view, watched.error = view, None
        known = [p.published for p in view.partitions]
        published = sum(p for p in known if p is not None) if all(p is not None for p in known) else None
        sample = _Sample(time.monotonic(), published, view.pending, view.dead_letters)
        if watched.samples:
            last = watched.samples[-1]
            span = max(1e-6, sample.at - last.at)
            rate: dict[str, float | None] = {"at": time.time(), "published": None, "handled": None,
                                             "failed": max(0, sample.dead - last.dead) / span}
            if published is not None and last.published is not None:
                appended = max(0, published - last.published)
                rate["published"] = appended / span
                rate["handled"] = max(0, appended - (sample.pending - last.pending)) / span
            watched.rates.append(rate)
        watched.samples.append(sample)

    def state(self) -> dict[str, Any]:
        groups = []
        for (topic, group), w in sorted(self.groups.items()):
            groups.append({
                "topic": topic,
                "group": group,
                "error": w.error,
                "view": None if w.view is None else w.view.as_json(),
                "rates": list(w.rates),
            })
        return {
            "provider": self.broker.provider,
            "where": self.config.where,
            "allow_changes": self.config.allow_changes,
            "csrf": self.config.csrf,
            "health": {"healthy": self.healthy, "latency": self.latency, "checked_at": self.checked_at,
                       "rounds": self.rounds},
            "listing": self.listing,
            "interval": self.config.interval,
            "groups": groups,
        }


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "message_id": letter.message_id,
        "partition": letter.partition,
        "partition_key": letter.partition_key,
        "attempts": letter.attempts,
        "error": letter.error,
        "dead_lettered_at": letter.dead_lettered_at.isoformat(),
        "headers": dict(letter.headers),
        "payload": letter.payload.decode("utf-8", "replace"),
    }


def _matches(letter: DeadLetter, text: str, partition: int | None) -> bool:
    if partition is not None and letter.partition != partition:
        return False
    if not text:
        return True
    text = text.lower()
    fields = [letter.message_id, letter.error, letter.partition_key, *letter.headers.keys(), *letter.headers.values()]
    return any(text in f.lower() for f in fields)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(broker: Broker, config: DashboardConfig, sampler: Sampler | None = None) -> Starlette:
    """The dashboard's ASGI app over an open ``broker``; runs its own sampler while served
    (or uses ``sampler``, which the caller then runs)."""
    own = sampler is None
    sampling = sampler or Sampler(broker, config)
    static = resources.files("msgbroker.dashboard").joinpath("static")

    def check_access(request: Request) -> Response | None:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0]
        if is_loopback(config.host) and not is_loopback(host):
            return JSONResponse({"error": f"Host {host!r} is not loopback: open the dashboard as http://127.0.0.1"},
                                status_code=421)
        if config.token is None:
            return None
        offered = [request.cookies.get(COOKIE, ""), request.query_params.get("token", "")]
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        if any(o and hmac.compare_digest(o.encode(), config.token.encode()) for o in offered):
            return None
        return JSONResponse({"error": "a token is required: open the dashboard's URL with ?token=..."},
                            status_code=401)

    def check_change(request: Request) -> None:
        if not config.allow_changes:
            raise _Refused(403, "the dashboard is read-only: start it with --allow-changes to replay or purge")
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise _Refused(403, "cross-site request refused")
        origin = request.headers.get("origin")
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin is not None and origin != expected:
            raise _Refused(403, f"cross-origin request refused (Origin {origin!r})")
        if not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), config.csrf.encode()):
            raise _Refused(403, f"missing or wrong {CSRF_HEADER} header")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise _Refused(415, "send JSON (Content-Type: application/json)")

    def secured(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            refused = check_access(request)
            if refused is None:
                try:
                    refused = await handler(request)
                except _Refused as exc:
                    refused = JSONResponse({"error": str(exc)}, status_code=exc.status)
                except (MsgBrokerError, OSError) as exc:
                    refused = JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=502)
            refused.headers["Content-Security-Policy"] = CSP
            refused.headers["X-Content-Type-Options"] = "nosniff"
            refused.headers["Referrer-Policy"] = "no-referrer"
            refused.headers["Cache-Control"] = "no-store"
            return refused

        return endpoint

    def asset(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            response = Response(static.joinpath(name).read_bytes(), media_type=media_type)
            token = request.query_params.get("token")
            if name == "index.html" and token and config.token is not None:
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response

        return secured(serve)

    async def state(request: Request) -> Response:
        return JSONResponse(sampling.state())

    def target(data: Mapping[str, Any]) -> tuple[str, str]:
        topic, group = data.get("topic"), data.get("group")
        if not isinstance(topic, str) or not isinstance(group, str) or (topic, group) not in sampling.groups:
            raise _Refused(404, f"unknown topic/group {topic!r}/{group!r}")
        return topic, group

    async def letters(request: Request) -> Response:
        topic, group = target(request.query_params)
        raw = request.query_params.get("partition", "")
        try:
            partition = int(raw) if raw else None
        except ValueError:
            raise _Refused(400, f"partition={raw!r} is not a number") from None
        found = [letter for letter in await broker.dead_letters(topic, group)
                 if _matches(letter, request.query_params.get("q", ""), partition)]
        return JSONResponse({"total": len(found), "letters": [_letter_json(x) for x in found[:DEAD_LETTER_PAGE]]})

    async def body(request: Request) -> tuple[str, str, list[str] | None]:
        check_change(request)
        try:
            data = json.loads(await request.body())
        except ValueError:
            raise _Refused(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise _Refused(400, "the request body must be a JSON object")
        topic, group = target(data)
        ids = data.get("ids")
        if data.get("all") is True:
            return topic, group, None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _Refused(400, "say which dead letters: {\"ids\": [...]} or {\"all\": true}")
        return topic, group, ids

    async def replay(request: Request) -> Response:
        topic, group, ids = await body(request)
        if ids is None:
            ids = [letter.message_id for letter in await broker.dead_letters(topic, group)]
        replayed = 0
        for start in range(0, len(ids), REPLAY_CHUNK):
            replayed += await broker.replay_dead_letters(topic, group, ids[start:start + REPLAY_CHUNK])
        log.warning("dashboard: replayed %d dead letter(s) of %s/%s", replayed, topic, group)
        return JSONResponse({"topic": topic, "group": group, "replayed": replayed})

    async def purge(request: Request) -> Response:
        topic, group, ids = await body(request)
        listed = await broker.dead_letters(topic, group)
        doomed = listed if ids is None else [x for x in listed if x.message_id in set(ids)]
        removed = await broker.transport.remove_listed_dead_letters(topic, group, doomed) if doomed else 0
        log.warning("dashboard: purged %d dead letter(s) of %s/%s", removed, topic, group)
        return JSONResponse({"topic": topic, "group": group, "purged": removed})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(sampling.run()) if own else None
        try:
            yield
        finally:
            if task is not None:
                sampling.stopped = True
                task.cancel()
                # bounded: a round stuck in a client call must not keep the process from exiting
                await asyncio.wait({task}, timeout=10)
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.warning("dashboard: the sampling loop failed: %r", task.exception())

    return Starlette(
        routes=[
            Route("/", asset("index.html", "text/html; charset=utf-8")),
            Route("/app.js", asset("app.js", "text/javascript; charset=utf-8")),
            Route("/app.css", asset("app.css", "text/css; charset=utf-8")),
            Route("/api/state", secured(state)),
            Route("/api/dead-letters", secured(letters)),
            Route("/api/replay", secured(replay), methods=["POST"]),
            Route("/api/purge", secured(purge), methods=["POST"]),
        ],
        lifespan=lifespan,
    )
