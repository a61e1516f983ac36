"""The four clusters, by name."""

from __future__ import annotations

from .kafka_cluster import KafkaCluster
from .nats_cluster import NatsCluster
from .node import Cluster
from .rabbitmq_cluster import RabbitMQCluster
from .redis_cluster import RedisCluster

CLUSTER_NAMES = ("redis", "nats", "rabbitmq", "kafka")

CLUSTERS: dict[str, Cluster] = {c.name: c for c in (RedisCluster(), NatsCluster(), RabbitMQCluster(), KafkaCluster())}


def clusters_arg(names: list[str]) -> list[Cluster]:
    return [CLUSTERS[n] for n in (names or CLUSTER_NAMES)]
