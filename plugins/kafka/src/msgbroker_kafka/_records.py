"""How a msgbroker record travels as a Kafka record: its message id header and its headers
(record key = partition key, value = body; docs/wire-format.md).

Shared by the transport (publishing, reading dead letters) and the consumer (deliveries), so
that neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from msgbroker.spi import MESSAGE_ID_HEADER

__all__ = ["MESSAGE_ID_HEADER", "decode_headers", "encode_headers"]


def encode_headers(headers: dict[str, str]) -> list[tuple[str, bytes]]:
    """msgbroker headers as Kafka record headers."""
    return [(name, value.encode("utf-8")) for name, value in headers.items()]


def decode_headers(raw: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """Kafka record headers as msgbroker headers (bytes that are not UTF-8 are replaced)."""
    return {name: (value or b"").decode("utf-8", errors="replace") for name, value in (raw or ())}
