"""3-node clusters on loopback (``scripts/brokers cluster ...``): Redis Cluster, NATS with
JetStream clustering, RabbitMQ and Kafka (KRaft). Each node has its own ports and folder under
``.brokers/cluster/<name>/<node>/``; the settings go to ``.brokers/cluster.env``.

Modules, each importing only those listed before it (and the single-server modules above):
``node`` (``Node`` and ``Cluster``), ``redis_cluster``, ``nats_cluster``, ``rabbitmq_cluster``,
``kafka_cluster``, ``clusters`` (the four by name), ``envfile`` (``.brokers/cluster.env``),
``commands``. This file is also the lock of the cluster commands, apart from the single
servers' lock, so that a slow ``cluster up`` never holds up a test run's ``restart redis``.
"""
