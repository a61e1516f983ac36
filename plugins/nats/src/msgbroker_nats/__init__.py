"""msgbroker-nats: the NATS JetStream provider for msgbroker (``nats://``, ``tls://``).

Installed, it is found through the ``msgbroker.providers`` entry point:
``msgbroker.connect("nats://127.0.0.1:4222")``. See docs/providers/nats.md.
"""

from __future__ import annotations

# First: with an untested nats-py installed, importing the package fails here, naming it.
from ._compat import UntestedClientVersion

# isort: split
from ._consumer import PULL_EXPIRES, NatsLaneConsumer
from ._layout import TopicLayout
from ._settings import NatsSettings
from ._transport import DEAD_LETTER_HEADERS, NatsTransport

__all__ = [
    "DEAD_LETTER_HEADERS",
    "PULL_EXPIRES",
    "NatsLaneConsumer",
    "NatsSettings",
    "NatsTransport",
    "TopicLayout",
    "UntestedClientVersion",
]
