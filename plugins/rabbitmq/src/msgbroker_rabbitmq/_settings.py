"""The RabbitMQ provider's settings section, ``rabbitmq`` (``BrokerSettings().rabbitmq``,
``MSGBROKER_RABBITMQ__<KEY>``, a settings file's ``RabbitMQ`` section). See docs/providers/rabbitmq.md."""

from __future__ import annotations

from datetime import timedelta

from msgbroker.spi import Duration, ProviderSettings
from pydantic import Field

__all__ = ["RabbitMQSettings"]


class RabbitMQSettings(ProviderSettings):
    """RabbitMQ provider."""

    url: str = "amqp://guest:guest@localhost:5672/"
    """The server, or the nodes of a cluster as a comma-separated list of URLs: each connection
    tries them in this order and, when it is lost, reconnects to the next one that answers."""
    exchange_prefix: str = "msgbroker"
    """First part of every exchange and queue name (1-50 of ``A-Z a-z 0-9 _ . -``)."""
    prefetch: int = Field(32, ge=1)
    """Unacked messages the server pushes ahead per lane (the QoS of the lane's channel). A
    handover hands them back uncounted; a member that dies holding them counts one delivery each
    (docs/providers/rabbitmq.md, *Handover*). 1 costs a round trip per message per lane."""
    queue_type: str = "quorum"
    """Only ``quorum`` is accepted: lanes need the delivery count and requeue position quorum queues keep."""
    quorum_initial_group_size: int | None = Field(None, ge=1)
    """How many nodes replicate each quorum queue the provider declares
    (``x-quorum-initial-group-size``); None leaves it to the server (its ``quorum_cluster_size``).
    Only queues declared from then on get it: redeclaring an existing one with another size is refused."""
    claim_timeout: Duration = timedelta(seconds=8)
    """How long a member may stay silent before its partitions move to the others."""
    queue_expires: Duration | None = None
    """Let the server delete a topic's and group's queues once unused this long (``x-expires``;
    for tests and short-lived topics). None (the default) keeps them until deleted by hand."""
    ssl_cafile: str | None = None
    """The CA certificate bundle (PEM) that signed the server's TLS certificate, for an
    ``amqps://`` url (set with an ``amqp://`` url it is an error); None trusts the system's CAs."""
