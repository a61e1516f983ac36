"""The single servers, by name (redis-auth, nats-auth: the Redis and the NATS that demand credentials)."""

from __future__ import annotations

from .broker import Broker
from .kafka_server import Kafka
from .nats_auth_server import NatsAuth
from .nats_server import Nats
from .rabbitmq_server import RabbitMQ
from .redis_auth_server import RedisAuth
from .redis_server import Redis

ALL = ("redis", "redis-auth", "nats", "nats-auth", "rabbitmq", "kafka")

BROKERS: dict[str, Broker] = {b.name: b for b in (Redis(), RedisAuth(), Nats(), NatsAuth(), RabbitMQ(), Kafka())}


def names_arg(names: list[str]) -> list[Broker]:
    return [BROKERS[n] for n in (names or ALL)]
