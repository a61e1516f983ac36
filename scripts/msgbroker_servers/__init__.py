"""Real brokers on loopback: install, start, stop and break Redis, NATS JetStream, RabbitMQ
and Apache Kafka for this repository's tests, as single servers and as 3-node clusters.

Run it through ``scripts/brokers`` (which prepares the venv first); see docs/brokers.md.

Every server listens on 127.0.0.1 only and keeps everything it writes (config, data, log,
pid file, chosen ports) under ``.brokers/<name>/`` at the repository root (cluster nodes under
``.brokers/cluster/<name>/<node>/``); the Kafka jars are kept in ``.cache/kafka/`` and the
cluster's nats-server build in ``.cache/nats-server/``. Both folders are ignored by git.
Progress goes to stderr; the ``MSGBROKER_*`` settings of the servers that are up go to stdout
and to ``.brokers/env`` (``.brokers/cluster.env`` for the clusters).

Modules, each importing only those listed before it:

- ``common``: paths, the loopback host, ``Failure`` and ``say``
- ``processes``: processes we start and track through pid files
- ``ports``: choosing and remembering ports
- ``apt``: installing Debian packages without starting their services
- ``tls``: the throw-away test CA
- ``broker``: what every single server has in common (``Broker``)
- ``redis_server``, ``nats_server``, ``rabbitmq_server``, ``kafka_server``: one per server
  (``postgres_server``: PostgreSQL for the outbox and inbox)
- ``envfile``: ``.brokers/env``
- ``locking``, ``commands``: the single-server commands
- ``cluster``: the 3-node clusters (a subpackage of the same shape)
- ``cli``: the command line
"""
