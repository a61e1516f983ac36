"""msgbroker-rabbitmq: the RabbitMQ provider of msgbroker (``amqp://``, ``amqps://``).

Installed, it is found through the ``msgbroker.providers`` entry point; use it with
``msgbroker.connect("amqp://guest:guest@localhost:5672/")``. See docs/providers/rabbitmq.md.
"""

from __future__ import annotations

# First: with an untested aio-pika or aiormq installed, importing the package fails here, naming it.
from ._compat import UntestedClientVersion

# isort: split
from ._names import Topology
from ._settings import RabbitMQSettings
from ._transport import RabbitMQLaneConsumer, RabbitMQTransport

__all__ = ["RabbitMQLaneConsumer", "RabbitMQSettings", "RabbitMQTransport", "Topology", "UntestedClientVersion"]
