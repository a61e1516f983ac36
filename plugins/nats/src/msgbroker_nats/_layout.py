"""Where things live on the server: stream, subject and consumer names, and the wire envelope.

One stream per topic (``<stream_prefix>_<topic>``), one subject per partition
(``<stream_prefix>.<topic>.<partition>``), one durable pull consumer per (group, partition)
(``<group>_<partition>``). Stream and consumer names may not contain ``.``, which topic and group
names may: it is written ``~``, a character topic and group names cannot hold, so the mapping
stays one-to-one (``orders.dlq`` -> ``MSGBROKER_orders~dlq``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from msgbroker.spi import NATS_ENVELOPE_HEADER, ConfigurationError

__all__ = [
    "ENVELOPE_HEADER",
    "MSG_ID_HEADER",
    "Envelope",
    "TopicLayout",
    "decode_envelope",
    "encode_envelope",
    "validate_stream_prefix",
]

ENVELOPE_HEADER = NATS_ENVELOPE_HEADER
"""One NATS header carries message id, partition key and the user's headers as JSON (ASCII):
NATS headers are line-based and nats-py strips and folds values, so arbitrary text would not
survive a round trip (docs/wire-format.md)."""
MSG_ID_HEADER = "Nats-Msg-Id"
"""JetStream's native dedup key, set only when deduplication is asked for."""

_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: "$" would let a trailing newline in
_PARTITION_COUNT = re.compile(r"partition_count=(\d+)")


def validate_stream_prefix(prefix: str) -> str:
    """``stream_prefix`` is both a subject token and the head of stream names."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigurationError(
            f"nats.stream_prefix={prefix!r} is invalid: use 1-64 characters of A-Z a-z 0-9 _ -"
        )
    return prefix


def _escape(name: str) -> str:
    return name.replace(".", "~")


@dataclass(frozen=True, slots=True)
class TopicLayout:
    """The names one topic uses on the server."""

    prefix: str
    topic: str

    @property
    def stream(self) -> str:
        return f"{self.prefix}_{_escape(self.topic)}"

    @property
    def subjects(self) -> str:
        """The stream's subject filter: every partition of the topic."""
        return f"{self.prefix}.{self.topic}.*"

    def subject(self, partition: int) -> str:
        return f"{self.prefix}.{self.topic}.{partition}"

    def partition_of(self, subject: str) -> int:
        return int(subject.rpartition(".")[2])

    @staticmethod
    def consumer(group: str, partition: int) -> str:
        """The durable consumer of one lane of ``group``."""
        return f"{_escape(group)}_{partition}"

    def description(self, partition_count: int) -> str:
        """Stored on the stream so that a connection with another partition count is refused."""
        return f"msgbroker topic {self.topic} partition_count={partition_count}"

    @staticmethod
    def partition_count_of(description: str | None) -> int | None:
        match = _PARTITION_COUNT.search(description or "")
        return int(match.group(1)) if match else None

    @property
    def dead_letters(self) -> TopicLayout:
        """The dead-letter topic ``<topic>.dlq`` (a topic like any other, so it can be subscribed to)."""
        return TopicLayout(self.prefix, f"{self.topic}.dlq")


@dataclass(frozen=True, slots=True)
class Envelope:
    """What msgbroker adds to a message body on the wire."""

    message_id: str
    key: str
    headers: dict[str, str]


def encode_envelope(message_id: str, key: str, headers: Mapping[str, str]) -> str:
    data: dict[str, object] = {"i": message_id, "k": key}
    if headers:
        data["h"] = dict(headers)
    return json.dumps(data, separators=(",", ":"))  # ensure_ascii: no CR/LF, no non-ASCII on the wire


def decode_envelope(raw: str | None, fallback_id: str) -> Envelope:
    """The envelope of a delivered message; a foreign or damaged one gets an id from its sequence
    (its body is then decoded as usual, and a bad body dead-lettered as poison)."""
    if raw:
        try:
            data = json.loads(raw)
            headers = data.get("h") or {}
            if isinstance(data, dict) and isinstance(headers, dict):
                return Envelope(str(data.get("i") or fallback_id), str(data.get("k") or ""),
                                {str(k): str(v) for k, v in headers.items()})
        except (ValueError, AttributeError):
            pass
    return Envelope(fallback_id, "", {})
