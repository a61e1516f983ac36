"""Apache Kafka: 3 KRaft nodes, each broker and controller in one process, one cluster id, the
controller quorum over all 3; replication factor 3 and min.insync.replicas 2. The jars are the
single Kafka's (.cache/kafka/)."""

from __future__ import annotations

import os

from ..common import HOST, Failure, say
from ..kafka_server import LOG4J2_PROPERTIES, Kafka, format_storage, jvm_command, new_cluster_id
from ..processes import spawn
from .node import Cluster, Node

HEAP = os.environ.get("MSGBROKER_BROKERS_KAFKA_CLUSTER_HEAP", "384m")


class KafkaCluster(Cluster):
    name = "kafka"
    title = "Kafka cluster"
    env_var = "MSGBROKER_TEST_CLUSTER_KAFKA_BOOTSTRAP_SERVERS"
    port_bases = (("port", 9201), ("controller_port", 9301))
    start_timeout = 180.0
    stop_timeout = 30.0
    poll_interval = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.jars = Kafka()  # the single Kafka's installation: its jars serve the cluster too
        self.cluster_id_file = self.dir / "cluster_id"

    def missing_packages(self) -> list[str]:
        return self.jars.missing_packages()

    def install_other(self) -> None:
        self.jars.install_other()

    def stop_all(self) -> bool:
        # One at a time, the last broker would wait in vain for a controller quorum to let it go.
        return self.stop_all_at_once()

    def url(self, node: Node) -> str:
        return f"{HOST}:{node.need_port()}"

    def before_launch(self) -> None:
        # An id starting with "-" (written before new_cluster_id avoided it) never formatted a node.
        if not self.cluster_id_file.exists() or self.cluster_id_file.read_text().startswith("-"):
            self.cluster_id_file.write_text(new_cluster_id() + "\n")

    def launch(self, node: Node) -> int:
        data = node.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (node.dir / "logs").mkdir(exist_ok=True)
        (node.dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
        port, cport = node.need_port(), node.need_port("controller_port")
        voters = ",".join(f"{n.index}@{HOST}:{n.need_port('controller_port')}" for n in self.nodes)
        props = node.dir / "server.properties"
        props.write_text(
            "# written by scripts/brokers cluster; rewritten at every start\n"
            "process.roles=broker,controller\n"
            f"node.id={node.index}\n"
            f"controller.quorum.voters={voters}\n"
            f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}\n"
            f"advertised.listeners=PLAINTEXT://{HOST}:{port}\n"
            "controller.listener.names=CONTROLLER\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n"
            f"log.dirs={data}\n"
            "num.partitions=1\n"
            "auto.create.topics.enable=true\n"
            "default.replication.factor=3\n"
            "min.insync.replicas=2\n"
            "offsets.topic.replication.factor=3\n"
            "offsets.topic.num.partitions=10\n"
            "transaction.state.log.replication.factor=3\n"
            "transaction.state.log.min.isr=2\n"
            "share.coordinator.state.topic.replication.factor=3\n"
            "share.coordinator.state.topic.min.isr=2\n"
            "unclean.leader.election.enable=false\n"
            "group.initial.rebalance.delay.ms=0\n"
            # a killed node comes back soon: its old registration must not hold it up long
            "broker.heartbeat.interval.ms=1000\n"
            "broker.session.timeout.ms=4000\n"
            "log.flush.interval.ms=1000\n"
        )
        jvm = jvm_command(HEAP, node.dir)
        if not (data / "meta.properties").exists():
            cluster_id = self.cluster_id_file.read_text().strip()
            say(f"kafka: formatting node {node.index}'s KRaft storage (cluster id {cluster_id})")
            if not format_storage(jvm, cluster_id, props, node.log):
                raise Failure(f"{node.label}: formatting the storage failed; {node.hint()}")
        return spawn([*jvm, "kafka.Kafka", str(props)], node.log, cwd=node.dir)

    async def node_answers(self, node: Node) -> None:
        from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

        admin = AIOKafkaAdminClient(bootstrap_servers=self.url(node), request_timeout_ms=4000)
        await admin.start()
        try:
            await admin.list_topics()  # a metadata request
        finally:
            await admin.close()

    async def not_formed(self) -> str | None:
        """All 3 brokers registered (a metadata request lists them, with a controller), and every
        partition's in-sync replicas are all its replicas."""
        from aiokafka.admin import AIOKafkaAdminClient

        running = self.running()
        if len(running) < self.size:
            return f"{self.size - len(running)} of {self.size} nodes are not running"
        admin = AIOKafkaAdminClient(bootstrap_servers=",".join(self.url(n) for n in running),
                                    request_timeout_ms=4000)
        await admin.start()
        try:
            meta = await admin.describe_cluster()
            brokers = sorted(int(b["node_id"]) for b in meta.get("brokers", []))
            if brokers != [n.index for n in self.nodes]:
                return f"brokers registered: {brokers}"
            if int(meta.get("controller_id", -1)) < 0:
                return "no active controller"
            topics = await admin.list_topics()
            if topics:
                for topic in await admin.describe_topics(list(topics)):
                    for p in topic.get("partitions", []):
                        replicas, isr = sorted(p.get("replicas", [])), sorted(p.get("isr", []))
                        if replicas != isr:
                            return (f"{topic.get('topic')}[{p.get('partition')}]: in sync {isr} "
                                    f"of replicas {replicas}")
        finally:
            await admin.close()
        return None

