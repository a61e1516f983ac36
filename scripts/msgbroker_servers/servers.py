"""The single servers, by name (redis-auth, nats-auth: the Redis and the NATS that demand credentials;
postgres: the database of the outbox and inbox, plugins/outbox)."""

from __future__ import annotations

from .broker import Broker
from .kafka_server import Kafka
from .nats_auth_server import NatsAuth
from .nats_server import Nats
from .postgres_server import Postgres
from .rabbitmq_server import RabbitMQ
from .redis_auth_server import RedisAuth
from .redis_server import Redis

ALL = ("redis", "redis-auth", "nats", "nats-auth", "rabbitmq", "kafka", "postgres")

BROKERS: dict[str, Broker] = {b.name: b for b in (Redis(), RedisAuth(), Nats(), NatsAuth(), RabbitMQ(), Kafka(),
                                                Postgres())}


def names_arg(names: list[str]) -> list[Broker]:
    return [BROKERS[n] for n in (names or ALL)]
