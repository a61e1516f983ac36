"""``Service.lifespan`` in a Starlette application, with Starlette's own TestClient (issue 19,
deliverable 3; the FastAPI example is examples/service/tests/test_api.py): subscribers start with
the app and drain when it stops, a route publishes, a failed start fails the app's startup."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import msgbroker
import pytest
from msgbroker import Message
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient


class Note(Message):
    text: str


def app_for(service: msgbroker.Service, handled: list[str]) -> Starlette:
    notes = service.publisher("notes", Note)

    @service.subscriber("notes", "writers", max_concurrency=1)  # one at a time: some are left at shutdown
    async def write(note: Note) -> None:
        await asyncio.sleep(0.05)
        handled.append(note.text)

    async def post(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"message_id": await notes.publish(Note(text=body["text"]))}, status_code=202)

    async def pending(request: Request) -> JSONResponse:
        return JSONResponse({"pending": await service.broker.pending_count("notes", "writers")})

    return Starlette(routes=[Route("/notes", post, methods=["POST"]), Route("/pending", pending)],
                     lifespan=service.lifespan)


def test_the_lifespan_starts_the_subscribers_and_drains_them_on_shutdown() -> None:
    service = msgbroker.Service(f"memory://asgi-{uuid.uuid4().hex[:8]}")
    handled: list[str] = []
    app = app_for(service, handled)
    with TestClient(app) as client:
        assert service.running
        for i in range(20):
            assert client.post("/notes", json={"text": f"n{i}"}).status_code == 202
        deadline = time.monotonic() + 10
        while not handled:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    # shutdown: the handlers in flight finished and were acked, the others stay for later
    assert not service.running and 1 <= len(handled) < 20
    first = set(handled)
    with TestClient(app) as client:  # started again on the same named broker: the rest is handled
        deadline = time.monotonic() + 10
        while client.get("/pending").json()["pending"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert sorted(handled) == sorted(f"n{i}" for i in range(20))  # each once: nothing lost or handled twice
    assert first <= set(handled[: len(first)])  # the second start did not handle the first's again


def test_a_lifespan_inside_the_apps_own() -> None:
    service = msgbroker.Service(f"memory://asgi-{uuid.uuid4().hex[:8]}")
    handled: list[str] = []
    inner = app_for(service, handled)
    order: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        order.append("db open")
        async with service.lifespan(app):
            order.append(f"service running={service.running}")
            yield
        order.append(f"service running={service.running}")

    app = Starlette(routes=inner.routes, lifespan=lifespan)
    with TestClient(app) as client:
        assert client.post("/notes", json={"text": "x"}).status_code == 202
    assert order == ["db open", "service running=True", "service running=False"]


def test_a_service_that_cannot_start_fails_the_apps_startup() -> None:
    service = msgbroker.Service("redis://127.0.0.1:1", redis={"url": "redis://127.0.0.1:1"})
    app = app_for(service, [])
    with pytest.raises(msgbroker.MsgBrokerError), TestClient(app):
        pass
    assert not service.running
