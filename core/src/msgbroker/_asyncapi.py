"""A service as an AsyncAPI 3.0 document: each topic a channel, each subscriber a ``receive``
operation (its group in ``x-msgbroker-group``), each publisher a ``send`` operation, each
message type a message whose payload is the pydantic model's JSON schema."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ._message import GenericMessage, Message

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = ["ASYNCAPI_VERSION", "document"]

ASYNCAPI_VERSION = "3.0.0"
_KEY = re.compile(r"[^A-Za-z0-9.\-_]")  # component and operation keys: ^[a-zA-Z0-9\.\-_]+$
_PROTOCOLS = {"redis": "redis", "nats": "nats", "rabbitmq": "amqp", "kafka": "kafka"}


class _Declared(Protocol):
    """A subscriber or a publisher (``msgbroker.Subscriber``, ``msgbroker.Publisher``)."""

    @property
    def topic(self) -> str: ...
    @property
    def message_type(self) -> type[Message]: ...
    @property
    def description(self) -> str | None: ...


class _Described(Protocol):
    """What the document says of a ``msgbroker.Service`` (which imports this module)."""

    title: str
    version: str
    description: str | None

    @property
    def subscribers(self) -> Sequence[Any]: ...
    @property
    def publishers(self) -> Sequence[_Declared]: ...


def _key(text: str) -> str:
    return _KEY.sub("_", text) or "_"


class _Schemas:
    """components/schemas and components/messages, one entry per model (names made unique)."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self._names: dict[type[Message], str] = {}

    def message(self, model: type[Message]) -> str:
        """The key of ``model``'s message, added on first use."""
        known = self._names.get(model)
        if known is not None:
            return known
        name = _key(model.__name__ if model is not GenericMessage else "Message")
        if name in self.messages:
            name = _key(f"{model.__module__}.{model.__qualname__}")
        self._names[model] = name
        if model is GenericMessage:
            payload: dict[str, Any] = {"$ref": f"#/components/schemas/{self._schema(Message, name)}"}
        else:
            payload = {"$ref": f"#/components/schemas/{self._schema(model, name)}"}
        entry: dict[str, Any] = {
            "name": name,
            "title": model.__name__,
            "contentType": "application/json",
            "payload": payload,
            "correlationId": {"location": "$message.payload#/correlation_id"},
        }
        doc = (model.__doc__ or "").strip()
        if doc and model.__doc__ != Message.__doc__ and model is not GenericMessage:
            entry["summary"] = doc.splitlines()[0].strip()
        self.messages[name] = entry
        return name

    def _schema(self, model: type[Message], name: str) -> str:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for nested, definition in schema.pop("$defs", {}).items():
            self.schemas.setdefault(nested, definition)
        self.schemas[name] = schema
        return name


def _server(broker: Broker) -> dict[str, Any] | None:
    settings = broker.settings
    provider = broker.provider
    protocol = _PROTOCOLS.get(provider)
    if protocol is None:
        return None
    section = getattr(settings, provider, None)
    if provider == "kafka":
        first = str(getattr(section, "bootstrap_servers", "")).split(",")[0].strip()
        host = first.split("://")[-1]
    else:
        url = getattr(section, "url", None)
        if not isinstance(url, str):
            return None
        parts = urlsplit(url.split(",")[0].strip())
        protocol = parts.scheme or protocol
        host = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
    if not host:
        return None
    return {"host": host, "protocol": protocol, "description": f"the {provider} broker"}


def document(service: _Described, broker: Broker | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``service`` (see the module docstring); ``broker`` is described
    as the server ``broker`` (never with credentials)."""
    schemas = _Schemas()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    def channel(topic: str, model: type[Message]) -> tuple[str, str]:
        key = _key(topic)
        entry = channels.setdefault(key, {"address": topic, "messages": {}})
        name = schemas.message(model)
        entry["messages"][name] = {"$ref": f"#/components/messages/{name}"}
        return key, name

    for sub in service.subscribers:
        key, name = channel(sub.topic, sub.message_type)
        op: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{name}"}],
            "title": sub.name,
            "x-msgbroker-group": sub.group,
            "x-msgbroker-ordered": sub.ordered,
        }
        if sub.description:
            op["summary"] = sub.description
        if sub.partition is not None:
            op["x-msgbroker-partition"] = sub.partition
        suffix = "" if sub.partition is None else f".{sub.partition}"
        op_key = _key(f"{sub.topic}.{sub.group}{suffix}")
        operations[op_key] = op
    for pub in service.publishers:
        key, name = channel(pub.topic, pub.message_type)
        op_key = _key(f"{pub.topic}.publish")
        existing = operations.get(op_key)
        ref = {"$ref": f"#/channels/{key}/messages/{name}"}
        if existing is not None:
            if ref not in existing["messages"]:
                existing["messages"].append(ref)
            continue
        op = {"action": "send", "channel": {"$ref": f"#/channels/{key}"}, "messages": [ref]}
        if pub.description:
            op["summary"] = pub.description
        operations[op_key] = op

    info: dict[str, Any] = {"title": service.title, "version": service.version}
    if service.description:
        info["description"] = service.description
    doc: dict[str, Any] = {"asyncapi": ASYNCAPI_VERSION, "info": info, "defaultContentType": "application/json"}
    server = _server(broker) if broker is not None else None
    if server is not None:
        doc["servers"] = {"broker": server}
    doc["channels"] = channels
    doc["operations"] = operations
    doc["components"] = {"messages": schemas.messages, "schemas": schemas.schemas}
    return doc
