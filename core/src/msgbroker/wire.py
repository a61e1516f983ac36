"""The wire format, defined once: what a record on ``<topic>`` and on ``<topic>.dlq`` carries.

Every provider reads and writes messages and dead letters through these names and functions,
so a service in another language can read and write them too (docs/wire-format.md says it
field by field, per broker; ``wire_vectors.json`` next to this module holds test vectors,
:func:`vectors` loads them).

**A message** (a record on ``<topic>``) is

* ``body``: the message as pydantic serialises it to JSON, UTF-8 (content type
  ``application/json``);
* ``message_id``: the message's id (a UUID as text), carried apart from the body;
* ``key``: its partition key; its partition is
  ``msgbroker.partition_for(key, partition_count)`` (Kafka's default partitioner);
* ``headers``: the user's headers, text to text. Names starting with :data:`RESERVED_PREFIX`
  (``msgbroker-``, in any case) are msgbroker's own: ``publish`` refuses them
  (:func:`is_reserved`), and the ones below are set by msgbroker or a provider.

**A dead letter** (a record on ``<topic>.dlq``, same partition, message id, key and body as the
original) carries the original's user headers plus the ``msgbroker-dead-letter-*`` headers of
:func:`dead_letter_headers`; :func:`dead_letter_from_record` reads one back into a
:class:`~msgbroker.DeadLetter`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from ._message import DeadLetter
from ._provider import OutgoingRecord

__all__ = [
    "CONTENT_TYPE",
    "DEAD_LETTERS_REMOVED_HEADER",
    "DEAD_LETTER_AT",
    "DEAD_LETTER_ATTEMPTS",
    "DEAD_LETTER_ERROR",
    "DEAD_LETTER_GROUP",
    "DEAD_LETTER_HEADERS",
    "DEAD_LETTER_PARTITION",
    "DEAD_LETTER_PREFIX",
    "DEAD_LETTER_TOPIC_SUFFIX",
    "KEY_HEADER",
    "MESSAGE_ID_HEADER",
    "NATS_ENVELOPE_HEADER",
    "REPLAY_GROUP_HEADER",
    "REPLY_STATUS_HEADER",
    "REPLY_TO_HEADER",
    "RESERVED_PREFIX",
    "dead_letter_from_record",
    "dead_letter_group",
    "dead_letter_headers",
    "dead_letter_record",
    "dead_letter_topic",
    "format_time",
    "is_reserved",
    "parse_time",
    "user_headers",
    "vectors",
]

RESERVED_PREFIX = "msgbroker-"
"""Header names starting with this (compared case-insensitively) are msgbroker's own."""

CONTENT_TYPE = "application/json"
"""What a body is: the message's JSON, UTF-8 (set where the broker has a place for it: AMQP)."""

# -- the envelope: where a broker has no field of its own for the id or the key ----------------

MESSAGE_ID_HEADER = "msgbroker-message-id"
"""Kafka: the record header carrying the message id (a Kafka record has no id of its own)."""
KEY_HEADER = "msgbroker-key"
"""RabbitMQ: the AMQP header carrying the partition key (the routing key is the partition)."""
NATS_ENVELOPE_HEADER = "Msgbroker"
"""NATS: the one JetStream header carrying ``{"i": message id, "k": key, "h": headers}`` as
ASCII JSON (NATS headers are line based; nats-py strips and folds values). A NATS header, not
a user header: the user's headers are inside it."""

REPLAY_GROUP_HEADER = "msgbroker-replay-group"
"""Set on a replayed dead letter: only that group handles it again, the others ack it unhandled."""

# -- request/reply (docs/semantics.md, "Request and reply") ---------------------------------------

REPLY_TO_HEADER = "msgbroker-reply-to"
"""On a request (``Broker.request``): the requester's reply address, opaque, made by its provider
(``Transport.open_replies``). A handler's returned message is sent there; a dead letter does not
carry it (reserved headers are not carried over)."""
REPLY_STATUS_HEADER = "msgbroker-reply-status"
"""On a reply: ``ok`` (the body is the handler's returned message, or ``null`` when it returned
none) or ``dead-lettered`` (the body is empty; :data:`DEAD_LETTER_ERROR` says why)."""

# -- dead letters ---------------------------------------------------------------------------------

DEAD_LETTER_TOPIC_SUFFIX = ".dlq"
"""The dead letters of ``orders`` are the records of the topic ``orders.dlq``."""
DEAD_LETTER_PREFIX = "msgbroker-dead-letter-"
DEAD_LETTER_ERROR = "msgbroker-dead-letter-error"
"""The last error, as text (``"<ExceptionType>: <message>"`` for a raised exception)."""
DEAD_LETTER_ATTEMPTS = "msgbroker-dead-letter-attempts"
"""Deliveries of the message, this last one included, as a decimal integer."""
DEAD_LETTER_GROUP = "msgbroker-dead-letter-group"
"""The group that gave up on the message (a ``<topic>.dlq`` holds the letters of every group)."""
DEAD_LETTER_PARTITION = "msgbroker-dead-letter-partition"
"""The original's partition, as a decimal integer (the letter is in the same partition)."""
DEAD_LETTER_AT = "msgbroker-dead-letter-at"
"""When it was dead-lettered: ISO 8601 in UTC with the offset (``2026-01-02T03:04:05.678901+00:00``)."""
DEAD_LETTER_HEADERS: tuple[str, ...] = (
    DEAD_LETTER_ERROR, DEAD_LETTER_ATTEMPTS, DEAD_LETTER_GROUP, DEAD_LETTER_PARTITION, DEAD_LETTER_AT,
)
"""Every header :func:`dead_letter_headers` adds. Error, attempts and group are there since the
first release; a letter without partition or time takes them from its record."""
DEAD_LETTERS_REMOVED_HEADER = "msgbroker-dead-letters-removed"
"""Kafka: on a marker record in ``<topic>.dlq.removed`` (with :data:`DEAD_LETTER_GROUP`), the
``partition:offset`` positions, comma-separated, of that group's letters removed (replayed)."""

_PREFIX_LENGTH = len(RESERVED_PREFIX)


def is_reserved(name: str) -> bool:
    """Whether a header name is msgbroker's own (``msgbroker-`` in any case): publish refuses it."""
    return name[:_PREFIX_LENGTH].lower() == RESERVED_PREFIX


def user_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` without msgbroker's own: what a replay publishes again, and what a dead
    letter keeps of its original."""
    return {name: value for name, value in headers.items() if not is_reserved(name)}


def dead_letter_topic(topic: str) -> str:
    """The topic holding the dead letters of ``topic``."""
    return f"{topic}{DEAD_LETTER_TOPIC_SUFFIX}"


def format_time(moment: datetime) -> str:
    """A time as the wire carries it: ISO 8601 in UTC with its offset (a naive time is UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def parse_time(text: str | None) -> datetime | None:
    """:func:`format_time` read back (any ISO 8601 with or without offset, ``Z`` too; a naive
    time is UTC); None for a missing or unreadable value."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def dead_letter_headers(letter: DeadLetter) -> dict[str, str]:
    """The headers of ``letter``'s record on ``<topic>.dlq``: the original's user headers (a
    reserved one, e.g. the replay group of a replayed message, is not carried over) and the
    :data:`DEAD_LETTER_HEADERS`."""
    headers = user_headers(letter.headers)
    headers[DEAD_LETTER_ERROR] = letter.error
    headers[DEAD_LETTER_ATTEMPTS] = str(letter.attempts)
    headers[DEAD_LETTER_GROUP] = letter.group
    headers[DEAD_LETTER_PARTITION] = str(letter.partition)
    headers[DEAD_LETTER_AT] = format_time(letter.dead_lettered_at)
    return headers


def dead_letter_record(letter: DeadLetter) -> OutgoingRecord:
    """``letter`` as a record on ``<topic>.dlq``: the original's partition, partition key,
    message id and body, with :func:`dead_letter_headers`."""
    return OutgoingRecord(dead_letter_topic(letter.topic), letter.partition, letter.partition_key,
                          letter.message_id, dead_letter_headers(letter), letter.payload)


def letter_key(letter: DeadLetter) -> tuple[str, datetime]:
    """What tells one stored dead letter from another letter of the same message (dead-lettered
    again after a replay): its message id and when it was dead-lettered — the same for every
    listing of one stored letter (``Transport.remove_listed_dead_letters``)."""
    return letter.message_id, letter.dead_lettered_at


def dead_letter_group(headers: Mapping[str, str]) -> str | None:
    """The group a ``<topic>.dlq`` record is a dead letter of; None for a record that is not one."""
    return headers.get(DEAD_LETTER_GROUP)


def _integer(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def dead_letter_from_record(
    topic: str,
    partition: int,
    message_id: str,
    key: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    dead_lettered_at: datetime | None = None,
) -> DeadLetter:
    """Read a ``<topic>.dlq`` record back: ``topic`` is the original topic (without ``.dlq``),
    the others are the record's. The partition is the header's (else the record's), the time the
    header's (else ``dead_lettered_at``, e.g. the broker's timestamp of the record, else now);
    an attempt count that is not a number reads as 0. Raises ``ValueError`` for a record that is
    not a dead letter (no :data:`DEAD_LETTER_GROUP`)."""
    group = dead_letter_group(headers)
    if group is None:
        raise ValueError(f"not a dead letter: record {message_id!r} has no {DEAD_LETTER_GROUP} header")
    at = parse_time(headers.get(DEAD_LETTER_AT)) or dead_lettered_at or datetime.now(UTC)
    return DeadLetter(
        message_id=message_id,
        topic=topic,
        group=group,
        partition=_integer(headers.get(DEAD_LETTER_PARTITION), partition),
        error=headers.get(DEAD_LETTER_ERROR, ""),
        attempts=_integer(headers.get(DEAD_LETTER_ATTEMPTS), 0),
        headers=user_headers(headers),
        payload=bytes(body),
        partition_key=key,
        dead_lettered_at=at,
    )


def vectors() -> dict[str, Any]:
    """The test vectors (``wire_vectors.json``, shipped with this package): messages and dead
    letters as records and decoded, for checking an implementation of this format."""
    text = resources.files("msgbroker").joinpath("wire_vectors.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data
