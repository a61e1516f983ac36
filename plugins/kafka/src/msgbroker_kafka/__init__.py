"""msgbroker-kafka: the Apache Kafka provider of msgbroker (``kafka://host:port``), on aiokafka."""

from __future__ import annotations

# First: with an untested aiokafka installed, importing the package fails here, naming it.
from ._compat import UntestedClientVersion

# isort: split
from ._assignor import PROTOCOL_NAME, PinningAssignor, assign_members
from ._consumer import AttemptRecord, KafkaLaneConsumer
from ._settings import KafkaSettings
from ._transport import DEAD_LETTER_TOPIC_SUFFIX, MESSAGE_ID_HEADER, KafkaTransport, dead_letter_topic

__all__ = [
    "DEAD_LETTER_TOPIC_SUFFIX",
    "MESSAGE_ID_HEADER",
    "PROTOCOL_NAME",
    "AttemptRecord",
    "KafkaLaneConsumer",
    "KafkaSettings",
    "KafkaTransport",
    "PinningAssignor",
    "UntestedClientVersion",
    "assign_members",
    "dead_letter_topic",
]
