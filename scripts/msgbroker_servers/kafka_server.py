"""Apache Kafka: jars from Maven Central in .cache/kafka/, one KRaft node (broker and
controller in one process) with a plain and an SSL listener."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from .broker import Broker
from .common import CACHE_ROOT, HOST, Failure, rel, say
from .ports import choose_port
from .processes import spawn
from .tls import TLS_CA, TLS_CERT, TLS_KEY, pem_property, tls_client_context

CACHE_DIR = CACHE_ROOT / "kafka"
KAFKA_VERSION = os.environ.get("MSGBROKER_BROKERS_KAFKA_VERSION", "4.1.2")
LOG4J_VERSION = "2.24.3"  # the log4j2 line Kafka 4.1 is built against
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
KAFKA_READY_TOPIC = "msgbroker-brokers-ready"


LOG4J2_PROPERTIES = (
    "# written by scripts/brokers\n"
    "status = warn\n"
    "appender.out.type = Console\n"
    "appender.out.name = OUT\n"
    "appender.out.layout.type = PatternLayout\n"
    "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
    "rootLogger.level = INFO\n"
    "rootLogger.appenderRef.out.ref = OUT\n"
    "logger.state.name = state.change.logger\n"
    "logger.state.level = WARN\n"
    "logger.clients.name = org.apache.kafka.clients\n"
    "logger.clients.level = WARN\n"
)


def java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


def jvm_command(heap: str, node_dir: Path) -> list[str]:
    """The java command line of a Kafka node whose logs and log4j2.properties are in node_dir."""
    return [
        java() or "java",
        f"-Xmx{heap}", "-Xms128m",
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dkafka.logs.dir={node_dir / 'logs'}",
        f"-Dlog4j2.configurationFile={node_dir / 'log4j2.properties'}",
        "-cp", f"{CACHE_DIR / 'lib'}/*",
    ]


def new_cluster_id() -> str:
    """A KRaft cluster id (16 random bytes, URL-safe base64), never starting with "-": the storage
    tool's argument parser takes such an id for an option and refuses to format (one id in 64)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def format_storage(jvm: list[str], cluster_id: str, props: Path, log: Path) -> bool:
    """Format a node's KRaft storage once (kafka.tools.StorageTool); False when that failed."""
    with open(log, "ab") as out:
        res = subprocess.run(
            [*jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False,
        )
    return res.returncode == 0


async def check_kafka(bootstrap: str, tls: bool = False) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
    from aiokafka.errors import TopicAlreadyExistsError  # type: ignore[import-untyped]

    options: dict[str, object] = {"security_protocol": "SSL", "ssl_context": tls_client_context()} if tls else {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=4000, **options)
    await admin.start()
    try:
        await admin.list_topics()  # a metadata request
        if tls:
            return  # the plain check below has shown the controller works
        try:
            resp = await admin.create_topics([NewTopic(KAFKA_READY_TOPIC, 1, 1)])
        except TopicAlreadyExistsError:
            return
        for topic_err in getattr(resp, "topic_errors", []) or getattr(resp, "topic_error_codes", []):
            code = topic_err[1]
            if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS
                raise Failure(f"CreateTopics answered error code {code}")
    finally:
        await admin.close()


class Kafka(Broker):
    name = "kafka"
    default_port = 9092
    env_var = "MSGBROKER_KAFKA__BOOTSTRAP_SERVERS"
    tls_default_port = 9192
    tls_env_var = "MSGBROKER_TEST_KAFKA_TLS_BOOTSTRAP_SERVERS"
    start_timeout = 90.0
    stop_timeout = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.controller_port_file = self.dir / "controller_port"
        self.lib = CACHE_DIR / "lib"
        self.stamp = CACHE_DIR / "lib.version"

    def url(self, port: int) -> str:
        return f"{HOST}:{port}"

    def tls_url(self, port: int) -> str:
        return f"{HOST}:{port}"

    def java(self) -> str | None:
        return java()

    def missing_packages(self) -> list[str]:
        if self.installed():
            return [] if self.java() else ["openjdk-17-jre-headless"]
        missing = [] if self.java() else ["openjdk-17-jdk-headless"]
        if not shutil.which("mvn"):
            missing.append("maven")
        return missing

    def installed(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            if self.stamp.read_text().strip() == KAFKA_VERSION and any(self.lib.glob("kafka_2.13-*.jar")):
                return True
        return False

    def install_other(self) -> None:
        if self.installed():
            return
        t0 = time.monotonic()
        say(f"fetching Apache Kafka {KAFKA_VERSION} jars from Maven Central into {rel(CACHE_DIR)}")
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        pom = CACHE_DIR / "pom.xml"
        pom.write_text(
            f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- written by scripts/brokers: the runtime class path of a single Kafka broker -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.msgbroker</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{DEPENDENCY_PLUGIN_VERSION}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""
        )
        tmp = CACHE_DIR / "lib.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            shutil.which("mvn") or "mvn", "-B", "-q", "-f", str(pom),
            f"-Dmaven.repo.local={CACHE_DIR / 'm2'}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
        ]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if res.returncode != 0:
            (CACHE_DIR / "mvn.log").write_text(res.stdout)
            raise Failure(
                f"kafka: mvn could not fetch the Kafka jars (exit {res.returncode}); "
                f"see {rel(CACHE_DIR / 'mvn.log')}"
            )
        shutil.rmtree(self.lib, ignore_errors=True)
        tmp.rename(self.lib)
        self.stamp.write_text(KAFKA_VERSION + "\n")
        shutil.rmtree(CACHE_DIR / "m2", ignore_errors=True)  # the jars are in lib/ now
        say(f"fetched Kafka {KAFKA_VERSION} in {time.monotonic() - t0:.0f}s")

    def jvm(self) -> list[str]:
        return jvm_command("512m", self.dir)

    def launch(self, port: int, tls_port: int) -> int:
        cport = choose_port(self.name, self.controller_port_file, 9093)
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        (self.dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
        props = self.dir / "server.properties"
        props.write_text(
            "# written by scripts/brokers; rewritten at every start\n"
            "process.roles=broker,controller\n"
            "node.id=1\n"
            f"controller.quorum.voters=1@{HOST}:{cport}\n"
            f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport},SSL://{HOST}:{tls_port}\n"
            f"advertised.listeners=PLAINTEXT://{HOST}:{port},SSL://{HOST}:{tls_port}\n"
            "controller.listener.names=CONTROLLER\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL\n"
            # the SSL listener's certificate, inline PEM (a PEM file would need an encrypted key)
            "ssl.keystore.type=PEM\n"
            f"ssl.keystore.certificate.chain={pem_property(TLS_CERT)}\n"
            f"ssl.keystore.key={pem_property(TLS_KEY)}\n"
            "ssl.truststore.type=PEM\n"
            f"ssl.truststore.certificates={pem_property(TLS_CA)}\n"
            "ssl.client.auth=none\n"
            f"log.dirs={data}\n"
            "num.partitions=1\n"
            "auto.create.topics.enable=true\n"
            "offsets.topic.replication.factor=1\n"
            "offsets.topic.num.partitions=10\n"
            "transaction.state.log.replication.factor=1\n"
            "transaction.state.log.min.isr=1\n"
            "share.coordinator.state.topic.replication.factor=1\n"
            "share.coordinator.state.topic.min.isr=1\n"
            "group.initial.rebalance.delay.ms=0\n"
            # after a kill -9 the new broker waits for its old registration to expire: keep it short
            "broker.heartbeat.interval.ms=1000\n"
            "broker.session.timeout.ms=4000\n"
            "log.flush.interval.ms=1000\n"
        )
        if not (data / "meta.properties").exists():
            cluster_id = new_cluster_id()
            say(f"kafka: formatting KRaft storage (cluster id {cluster_id})")
            if not format_storage(self.jvm(), cluster_id, props, self.log):
                raise Failure(f"kafka: formatting the storage failed; {self.log_hint()}")
        return spawn([*self.jvm(), "kafka.Kafka", str(props)], self.log, cwd=self.dir)

    async def check(self, url: str) -> None:
        await check_kafka(url)

    async def check_tls(self, url: str) -> None:
        await check_kafka(url, tls=True)
