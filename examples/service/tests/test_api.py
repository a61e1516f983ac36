"""The FastAPI front of the example with FastAPI's own TestClient (issue 19, deliverable 3): the
lifespan starts the ticket service's subscribers with the app and drains them when it stops; a
route publishes."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient
from msgbroker import BrokerClosedError
from ticket_api import api
from ticket_service import service


def test_a_route_publishes_and_the_subscriber_started_with_the_app_handles_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MSGBROKER_URL", f"memory://tickets-api-{uuid.uuid4().hex[:8]}")
    assert not service.running
    with TestClient(api) as client:
        assert service.running and [s.group for s in service.subscriptions] == ["seat-lockers"]
        assert client.get("/health").json() == {"broker": True}
        for seats in (["A-1", "A-2"], ["A-3"]):
            response = client.post("/sessions/s9/areas/north/locks", json={"seats": seats})
            assert response.status_code == 202 and response.json()["message_id"]
        deadline = time.monotonic() + 10
        while client.get("/sessions/s9/areas/north/locks").json()["seats"] != ["A-1", "A-2", "A-3"]:
            assert time.monotonic() < deadline, client.get("/sessions/s9/areas/north/locks").json()
            time.sleep(0.02)
        broker = service.broker
    # the app stopped: the service drained, left its group and closed the broker it opened
    assert not service.running
    with pytest.raises(BrokerClosedError):
        broker.live_transport()


def test_a_validation_error_is_the_apps_not_the_brokers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGBROKER_URL", f"memory://tickets-api-{uuid.uuid4().hex[:8]}")
    with TestClient(api) as client:
        assert client.post("/sessions/s9/areas/north/locks", json={"seats": "A-1"}).status_code == 422
