"""``Service.asyncapi()`` and ``msgbroker asyncapi module:service`` (issue 19, deliverable 4):
an AsyncAPI 3.0 document of the topics, groups and message schemas, valid against the AsyncAPI
Initiative's own JSON schema (vendored in data/asyncapi/, see its README)."""

from __future__ import annotations

import copy
import json
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

import jsonschema
import msgbroker
import pytest
import yaml
from msgbroker import Message, MessageContext
from msgbroker.cli import main
from pydantic import BaseModel, Field

SCHEMA = Path(__file__).parent / "data" / "asyncapi" / "asyncapi-3.0.0.schema.json"


def validate(document: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless ``document`` is a valid AsyncAPI 3.0.0 document."""
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(document)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


class Seat(BaseModel):
    row: str
    number: int = Field(ge=1)


class Currency(StrEnum):
    EUR = "EUR"
    USD = "USD"


class SeatLock(Message):
    """A request to lock seats of one area of one session."""

    session: uuid.UUID
    seats: list[Seat]
    day: date
    price: Decimal
    currency: Currency = Currency.EUR


class SeatLocked(Message):
    session: uuid.UUID
    seats: list[Seat]


def ticket_service() -> msgbroker.Service:
    service = msgbroker.Service("memory://tickets", title="tickets", version="2.1.0",
                                description="Seat locks for the ticket sale.")
    locked = service.publisher("seat-locked", SeatLocked, description="A lock was taken.")

    @service.subscriber("seat-locks", "lockers")
    async def lock(request: SeatLock) -> None:
        """Lock the seats, in order per area."""
        await locked.publish(SeatLocked(session=request.session, seats=request.seats))

    @service.subscriber("seat-locks", "audit", ordered=False)
    async def audit(ctx: MessageContext[SeatLock]) -> None:
        pass

    @service.subscriber("seat-locked", "mailer")
    async def mail(event: SeatLocked) -> None:
        pass

    @service.subscriber("legacy", "readers")
    async def anything(ctx) -> None:  # type: ignore[no-untyped-def]
        pass

    return service


def test_the_document_validates_and_describes_topics_groups_and_schemas() -> None:
    document = ticket_service().asyncapi()
    validate(document)
    assert document["asyncapi"] == "3.0.0"
    assert document["info"] == {"title": "tickets", "version": "2.1.0",
                                "description": "Seat locks for the ticket sale."}
    assert {k: v["address"] for k, v in document["channels"].items()} == {
        "seat-locks": "seat-locks", "seat-locked": "seat-locked", "legacy": "legacy"}
    receive = {k: (v["x-msgbroker-group"], v["x-msgbroker-ordered"])
               for k, v in document["operations"].items() if v["action"] == "receive"}
    assert receive == {"seat-locks.lockers": ("lockers", True), "seat-locks.audit": ("audit", False),
                       "seat-locked.mailer": ("mailer", True), "legacy.readers": ("readers", True)}
    send = {k: v["channel"]["$ref"] for k, v in document["operations"].items() if v["action"] == "send"}
    assert send == {"seat-locked.publish": "#/channels/seat-locked"}
    assert document["operations"]["seat-locks.lockers"]["summary"] == "Lock the seats, in order per area."
    # every reference resolves, and the payload is the pydantic model's schema
    lock_op = document["operations"]["seat-locks.lockers"]
    message = resolve(document, resolve(document, lock_op["messages"][0]["$ref"])["$ref"])
    assert message["summary"] == "A request to lock seats of one area of one session."
    payload = resolve(document, message["payload"]["$ref"])
    assert set(payload["properties"]) == {"message_id", "correlation_id", "created_at", "session", "seats", "day",
                                          "price", "currency"}
    assert payload["required"] == ["session", "seats", "day", "price"]
    assert payload["properties"]["day"] == {"format": "date", "title": "Day", "type": "string"}
    seat = resolve(document, payload["properties"]["seats"]["items"]["$ref"])
    assert seat["properties"]["number"] == {"minimum": 1, "title": "Number", "type": "integer"}
    assert resolve(document, payload["properties"]["currency"]["$ref"])["enum"] == ["EUR", "USD"]
    assert "Message" in document["components"]["messages"]  # the handler that takes any message
    assert "servers" not in document  # the in-memory broker is no server


def test_the_validator_refuses_a_broken_document() -> None:
    document = ticket_service().asyncapi()
    for breaking in ({"asyncapi": "2.6.0"}, {"operations": {"x": {"action": "listen", "channel": {"$ref": "#/a"}}}},
                     {"channels": {"x": {"address": "x", "partitions": 16}}},
                     {"components": {"messages": {"M": {"contentType": 5}}}}):
        broken = copy.deepcopy(document) | breaking
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)
    del document["info"]
    with pytest.raises(jsonschema.ValidationError, match="'info' is a required property"):
        validate(document)


def test_a_broker_becomes_the_server_without_credentials() -> None:
    service = ticket_service()
    broker = msgbroker.connect("amqp://app:s3cret@rabbit.example:5672/vhost")
    document = service.asyncapi(broker)
    validate(document)
    assert document["servers"] == {"broker": {"host": "rabbit.example:5672", "protocol": "amqp",
                                              "description": "the rabbitmq broker"}}
    assert "s3cret" not in json.dumps(document)


@pytest.fixture
def service_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"asyncapi_svc_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import msgbroker
        from msgbroker import Message

        class Order(Message):
            order_id: int

        service = msgbroker.Service(title="orders")

        @service.subscriber("orders", "workers")
        async def handle(order: Order) -> None:
            pass
    """))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_the_command_writes_json_or_yaml(service_module: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["asyncapi", f"{service_module}:service"]) == 0
    printed = json.loads(capsys.readouterr().out)
    validate(printed)
    assert list(printed["channels"]) == ["orders"]
    target = tmp_path / "asyncapi.yaml"
    assert main(["asyncapi", service_module, "-o", str(target), "--url", "redis://cache.example:6380/0"]) == 0
    assert "wrote" in capsys.readouterr().err
    written = yaml.safe_load(target.read_text())
    validate(written)
    assert written["servers"]["broker"] == {"host": "cache.example:6380", "protocol": "redis",
                                            "description": "the redis broker"}


def test_the_command_says_in_one_line_what_is_wrong(service_module: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["asyncapi", "no_such_module_here:service"]) == 1
    assert capsys.readouterr().err.strip() == (
        "msgbroker: error: cannot import 'no_such_module_here': no such module (run from the folder that has it, "
        "or install it)")
    assert main(["asyncapi", f"{service_module}:nothing"]) == 1
    assert f"'{service_module}' has no attribute 'nothing'" in capsys.readouterr().err
    assert main(["asyncapi", f"{service_module}:Order"]) == 1
    assert "is a ModelMetaclass, not a msgbroker.Service" in capsys.readouterr().err
