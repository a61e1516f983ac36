"""``msgbroker asyncapi ticket_service:service``: the example's AsyncAPI 3.0 document validates
against the AsyncAPI schema (core/tests/data/asyncapi/, vendored with its licence)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema

EXAMPLE = Path(__file__).resolve().parents[1]
SCHEMA = EXAMPLE.parents[1] / "core" / "tests" / "data" / "asyncapi" / "asyncapi-3.0.0.schema.json"


def test_the_example_services_document_validates(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"
    command = Path(sys.executable).with_name("msgbroker")
    done = subprocess.run([str(command), "asyncapi", "ticket_service:service", "-o", str(out),
                           "--url", "redis://redis.internal:6379/0"], cwd=EXAMPLE, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(document)
    assert document["info"]["title"] == "tickets"
    assert document["servers"]["broker"]["host"] == "redis.internal:6379"
    operations = document["operations"]
    assert operations["seat-lock-requests.seat-lockers"]["x-msgbroker-group"] == "seat-lockers"
    assert {k: v["action"] for k, v in operations.items()} == {
        "seat-lock-requests.seat-lockers": "receive", "seat-lock-requests.publish": "send",
        "seat-locked.publish": "send"}
    schemas = document["components"]["schemas"]
    assert schemas["SeatLock"]["required"] == ["session", "area", "seats"]
    assert set(schemas["SeatLocked"]["properties"]) >= {"session", "area", "seq", "seats", "worker"}
