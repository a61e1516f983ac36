"""The envelope codec: messages to records and deliveries back to messages, in one place."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from ._errors import InvalidNameError, MessageTooLargeError, SerializationError
from ._message import Message
from ._partitioner import partition_for
from ._provider import Delivery, OutgoingRecord
from .wire import REPLAY_GROUP_HEADER, RESERVED_PREFIX, is_reserved

__all__ = ["REPLAY_GROUP_HEADER", "check_headers", "decode", "encode", "validate_name"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")  # fullmatch: "$" would let "orders\n" pass


def validate_name(kind: str, value: object) -> str:
    """Topic and group names: 1-200 of ``A-Z a-z 0-9 _ . -``, not starting with ``.`` or ``-``,
    no ``..`` — safe as a Redis key part, a NATS subject token group, an AMQP or Kafka name."""
    if type(value) is str and value in _VALID_NAMES:  # every publish checks its topic: remember
        return value
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value or value.endswith("."):
        raise InvalidNameError(
            f"invalid {kind} name {value!r}: use 1-200 characters of A-Z a-z 0-9 _ . - "
            "(not starting with '.' or '-', no '..', not ending with '.')"
        )
    if type(value) is str:
        if len(_VALID_NAMES) >= 4096:
            _VALID_NAMES.clear()
        _VALID_NAMES.add(value)
    return value


_VALID_NAMES: set[str] = set()


def check_headers(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise InvalidNameError(f"invalid header {name!r}={value!r}: names and values must be str, names non-empty")
        if is_reserved(name):
            raise InvalidNameError(f"invalid header {name!r}: names starting with {RESERVED_PREFIX!r} are reserved "
                                   "for msgbroker's own (docs/wire-format.md); forward a delivery's headers with "
                                   "msgbroker.wire.user_headers(ctx.headers)")
        try:
            name.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidNameError(f"invalid header {name!r}: not encodable as UTF-8 ({exc.reason})") from exc
        out[name] = value
    return out


def encode(
    topic: str,
    message: Message,
    partition_count: int,
    max_bytes: int,
    headers: Mapping[str, str] | None = None,
    *,
    checked_headers: dict[str, str] | None = None,
) -> OutgoingRecord:
    """Serialise ``message`` (pydantic's JSON serialiser) and pick its partition.

    ``checked_headers``: ``headers`` already checked (a batch checks them once); copied."""
    if not isinstance(message, Message):
        raise SerializationError(f"publish takes a msgbroker.Message, got {type(message).__name__}")
    try:
        body = message.__pydantic_serializer__.to_json(message)
    except PydanticSerializationError as exc:
        raise SerializationError(f"cannot serialise {type(message).__name__} {message.message_id}: {exc}") from exc
    if len(body) > max_bytes:
        raise MessageTooLargeError(
            f"message {message.message_id} on {topic!r} is {len(body)} bytes; the limit is {max_bytes}"
        )
    cls = type(message)
    shape = _SHAPES.get(cls)
    if shape is None:
        shape = _SHAPES[cls] = (_serialises_id_plainly(cls), cls.partition_key is _DEFAULT_KEY)
    plain, default_key = shape
    # The body starts with the id as str() writes it (a UUID, no custom serialiser, first
    # field): take it from there rather than formatting the UUID a second time.
    if plain and body[51:52] == b'"' and body[:15] == b'{"message_id":"' and type(message.message_id) is _UUID:
        message_id = body[15:51].decode("ascii")
    else:
        message_id = str(message.message_id)
    if default_key:  # the default key is the message id: no second str() of the UUID
        key = message_id
    else:
        key = message.partition_key
        if not isinstance(key, str):
            raise SerializationError(f"partition_key of {type(message).__name__} must be str, got {key!r}")
    try:
        partition = partition_for(key, partition_count)
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"partition_key {key!r} of {type(message).__name__} is not encodable as UTF-8"
        ) from exc
    if checked_headers is not None:
        record_headers = dict(checked_headers)
    else:
        record_headers = check_headers(headers) if headers else {}
    return OutgoingRecord(topic, partition, key, message_id, record_headers, body)


_DEFAULT_KEY = Message.partition_key
_UUID = uuid.UUID
_SHAPES: dict[type[Message], tuple[bool, bool]] = {}
"""Per message class: (its body starts with the message id as str() writes it, its partition
key is the message id)."""


def _serialises_id_plainly(cls: type[Message]) -> bool:
    """True when pydantic writes ``message_id`` as a plain UUID: no alias, no serialiser of
    the class's own (then the JSON string is ``str(message_id)``)."""
    field = cls.model_fields.get("message_id")
    decorators = cls.__pydantic_decorators__
    return (
        field is not None
        and field.annotation is _UUID
        and not field.metadata
        and field.alias is None
        and field.serialization_alias is None
        and not decorators.field_serializers
        and not decorators.model_serializers
    )


def decode(delivery: Delivery, message_type: type[Message]) -> Message:
    """Parse a delivery's body; a :class:`SerializationError` marks a poison message."""
    try:
        # what model_validate_json does, less a call; the attribute is read each time so that
        # a model completed later (forward references) is rebuilt as pydantic does
        return message_type.__pydantic_validator__.validate_json(delivery.body)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise SerializationError(f"cannot decode as {message_type.__name__}: {exc}") from exc

