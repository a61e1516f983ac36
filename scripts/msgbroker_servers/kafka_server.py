"""Apache Kafka: jars from Maven Central in .cache/kafka/, one KRaft node (broker and
controller in one process) with a plain and an SSL listener, and two that demand credentials
(SASL_PLAINTEXT with SCRAM-SHA-512, SASL_SSL with PLAIN) for the least-privilege tenants of
kafka_acls (docs/security.md). The KRaft StandardAuthorizer checks ACLs on every listener; the
open listeners' ANONYMOUS is a super user, so everything that used them works as before."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from .broker import Broker
from .common import CACHE_ROOT, HOST, Failure, rel, say
from .kafka_acls import TENANTS, all_tenant_acls, create_acls, list_acls
from .passwords import kept_passwords
from .ports import choose_port, read_port
from .processes import spawn
from .tls import TLS_CA, TLS_CERT, TLS_KEY, pem_property, tls_client_context

CACHE_DIR = CACHE_ROOT / "kafka"
KAFKA_VERSION = os.environ.get("MSGBROKER_BROKERS_KAFKA_VERSION", "4.1.2")
LOG4J_VERSION = "2.24.3"  # the log4j2 line Kafka 4.1 is built against
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
KAFKA_READY_TOPIC = "msgbroker-brokers-ready"
CONFIG_GENERATION = "2"
"""What the server's listeners and security are: written beside the running server at start,
so that `up` restarts one an older scripts/brokers started (bump it when launch() changes them).
1: PLAINTEXT and SSL; 2: also SASL_PLAINTEXT (SCRAM-SHA-512), SASL_SSL (PLAIN), the authorizer."""
SCRAM = "SCRAM-SHA-512"
SUPER_USERS = "User:ANONYMOUS;User:admin"
"""ANONYMOUS: every client of the open listeners (and the controller's), as before the authorizer."""


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


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner alone (it holds passwords)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def _jaas_quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def check_sasl(bootstrap: str, user: str, password: str, mechanism: str, tls: bool) -> None:
    """Log in as ``user`` and fetch metadata (no ACL needed: the metadata lists what it may see)."""
    from aiokafka import AIOKafkaClient  # type: ignore[import-untyped]

    options: dict[str, object] = {"ssl_context": tls_client_context()} if tls else {}
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=4000,
                            security_protocol="SASL_SSL" if tls else "SASL_PLAINTEXT", sasl_mechanism=mechanism,
                            sasl_plain_username=user, sasl_plain_password=password, **options)
    try:
        await client.bootstrap()
    finally:
        await client.close()


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

    sasl_default_port = 9094
    """SASL_PLAINTEXT, SCRAM-SHA-512."""
    sasl_tls_default_port = 9194
    """SASL_SSL, PLAIN."""

    def __init__(self) -> None:
        super().__init__()
        self.controller_port_file = self.dir / "controller_port"
        self.sasl_port_file = self.dir / "sasl_port"
        self.sasl_tls_port_file = self.dir / "sasl_tls_port"
        self.generation_file = self.dir / "config_generation"
        self.secrets_file = self.dir / "passwords.json"
        self.users_stamp = self.dir / "users.provisioned"
        """The digest of the users and ACLs last put in place (after_ready)."""
        self.lib = CACHE_DIR / "lib"
        self.stamp = CACHE_DIR / "lib.version"

    # -- the users that log in (SCRAM-SHA-512 and PLAIN), their passwords and ACLs -------------

    @staticmethod
    def users() -> list[str]:
        return ["admin", *(f"tenant-{t}" for t in TENANTS)]

    def passwords(self) -> dict[str, str]:
        """{user: password}, made once and kept in .brokers/kafka/passwords.json (mode 0600)."""
        return kept_passwords(self.secrets_file, self.users())

    def secrets(self) -> list[str]:
        return list(self.passwords().values()) if self.secrets_file.exists() else []

    def sasl_url(self) -> str | None:
        port = read_port(self.sasl_port_file)
        return f"{HOST}:{port}" if port else None

    def sasl_tls_url(self) -> str | None:
        port = read_port(self.sasl_tls_port_file)
        return f"{HOST}:{port}" if port else None

    def _digest(self) -> str:
        wanted = {"passwords": self.passwords(), "acls": sorted(a.describe() for a in all_tenant_acls())}
        return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()

    def provisioned(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            return self.secrets_file.exists() and self.users_stamp.read_text().strip() == self._digest()
        return False

    def generation(self) -> str:
        """CONFIG_GENERATION and a digest of the passwords (the PLAIN users are in the config)."""
        digest = hashlib.sha256(json.dumps(self.passwords(), sort_keys=True).encode()).hexdigest()[:16]
        return f"{CONFIG_GENERATION} {digest}"

    def config_stale(self) -> str | None:
        found = ""
        with contextlib.suppress(FileNotFoundError):
            found = self.generation_file.read_text().strip()
        if found == self.generation():
            return None
        if found.split(" ")[0] == CONFIG_GENERATION:
            return "its PLAIN users' passwords are not those of .brokers/kafka/passwords.json"
        return "it was started by an older scripts/brokers (no SASL listeners, no authorizer)"

    async def _logs_in(self, user: str, mechanism: str, tls: bool) -> bool:
        url = self.sasl_tls_url() if tls else self.sasl_url()
        if not url:
            return False
        try:
            await asyncio.wait_for(check_sasl(url, user, self.passwords()[user], mechanism, tls), 8)
        except Exception:
            return False
        return True

    def _add_scram_user(self, bootstrap: str, user: str) -> None:
        """kafka-configs --alter --entity-type users: the user's SCRAM-SHA-512 credential, from a
        file of mode 0600 (never on a command line)."""
        config = self.dir / f"scram-{user}.properties"
        password = self.passwords()[user]
        # from a file, the value is taken as it stands: no [...] around it as on a command line
        _write_private(config, f"{SCRAM}=iterations=8192,password={password}\n")
        try:
            res = subprocess.run(
                [*jvm_command("256m", self.dir), "kafka.admin.ConfigCommand", "--bootstrap-server", bootstrap,
                 "--alter", "--entity-type", "users", "--entity-name", user, "--add-config-file", str(config)],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=120,
            )
        finally:
            config.unlink(missing_ok=True)
        said = (res.stdout + res.stderr).replace(password, "***")  # the tool repeats a value it refuses
        tool_log = self.dir / "kafka-configs.log"
        with open(tool_log, "a") as out:
            out.write(said)
        if res.returncode != 0:
            last = said.strip().splitlines()[-1:] or [""]
            raise Failure(f"kafka: creating the SCRAM user {user!r} failed (exit {res.returncode}): {last[0][:300]}; "
                          f"see {rel(tool_log)}")

    async def after_ready(self) -> None:
        """The SCRAM users (kafka-configs, only those that cannot log in) and the tenants' ACLs
        (only those missing), then a login of each user on both SASL listeners. Idempotent: the
        users and ACLs live in the metadata log, so a fresh data folder gets them again."""
        port = self.port()
        if port is None or self.external_url():
            return
        bootstrap = self.url(port)
        t0 = time.monotonic()
        # Kafka 4.1.2 here (one node, broker and controller in one process) refuses the SCRAM
        # users after a restart once a metadata snapshot holds them, until they are written
        # again: so this runs after `restart` too, and writes them at once (one JVM each).
        refused = [u for u, ok in zip(self.users(), await asyncio.gather(
            *(self._logs_in(u, SCRAM, tls=False) for u in self.users())), strict=True) if not ok]
        await asyncio.gather(*(asyncio.to_thread(self._add_scram_user, bootstrap, u) for u in refused))
        made = refused
        granted = await list_acls(bootstrap)
        missing = [acl for acl in all_tenant_acls() if acl not in granted]
        if missing:
            await create_acls(bootstrap, missing)
        for user in self.users():
            for mechanism, tls in ((SCRAM, False), ("PLAIN", True)):
                ok = False
                for _ in range(20):  # a new SCRAM credential reaches the broker's cache shortly after
                    ok = await self._logs_in(user, mechanism, tls)
                    if ok:
                        break
                    await asyncio.sleep(0.25)
                if not ok:
                    where = self.sasl_tls_url() if tls else self.sasl_url()
                    raise Failure(f"kafka: user {user!r} cannot log in with {mechanism} on {where}; {self.log_hint()}")
        if made or missing or not self.provisioned():
            self.users_stamp.write_text(self._digest() + "\n")
            say(f"kafka: SASL users {', '.join(self.users())} (SCRAM-SHA-512 on {self.sasl_url()}, PLAIN over TLS "
                f"on {self.sasl_tls_url()}); {len(made)} SCRAM credential(s) written, {len(missing)} ACL(s) created "
                f"({time.monotonic() - t0:.1f}s)")

    def extra_env(self) -> list[str]:
        """The SASL listeners' addresses, the tenants' users, passwords and prefixes, and the
        admin's, once they are in place."""
        if self.port() is None or self.external_url() or not self.provisioned():
            return []
        passwords = self.passwords()
        lines = [f"MSGBROKER_TEST_KAFKA_SASL_BOOTSTRAP_SERVERS={self.sasl_url()}",
                 f"MSGBROKER_TEST_KAFKA_SASL_TLS_BOOTSTRAP_SERVERS={self.sasl_tls_url()}",
                 "MSGBROKER_TEST_KAFKA_SASL_ADMIN_USER=admin",
                 f"MSGBROKER_TEST_KAFKA_SASL_ADMIN_PASSWORD={passwords['admin']}"]
        for t in TENANTS:
            up = t.upper()
            lines.append(f"MSGBROKER_TEST_KAFKA_SASL_USER_{up}=tenant-{t}")
            lines.append(f"MSGBROKER_TEST_KAFKA_SASL_PASSWORD_{up}={passwords[f'tenant-{t}']}")
            lines.append(f"MSGBROKER_TEST_KAFKA_SASL_PREFIX_{up}=tenant-{t}")
        return lines

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
        # On a restart the old process may take a moment to let go of the ports it had.
        patience = 10.0 if self.sasl_port_file.exists() else 1.0
        sport = choose_port(f"{self.name} (SASL)", self.sasl_port_file, self.sasl_default_port, patience)
        stport = choose_port(f"{self.name} (SASL over TLS)", self.sasl_tls_port_file, self.sasl_tls_default_port,
                             patience)
        passwords = self.passwords()
        plain_users = " ".join(f"user_{u}={_jaas_quoted(p)}" for u, p in passwords.items())
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        (self.dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
        props = self.dir / "server.properties"
        sasl_listeners = f"SASL_PLAINTEXT://{HOST}:{sport},SASL_SSL://{HOST}:{stport}"
        _write_private(  # mode 0600: the PLAIN users' passwords are in it
            props,
            "# written by scripts/brokers; rewritten at every start\n"
            "process.roles=broker,controller\n"
            "node.id=1\n"
            f"controller.quorum.voters=1@{HOST}:{cport}\n"
            f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport},SSL://{HOST}:{tls_port},"
            f"{sasl_listeners}\n"
            f"advertised.listeners=PLAINTEXT://{HOST}:{port},SSL://{HOST}:{tls_port},{sasl_listeners}\n"
            "controller.listener.names=CONTROLLER\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,"
            "SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL\n"
            # SCRAM users live in the metadata log (after_ready adds them); PLAIN users are these
            f"listener.name.sasl_plaintext.sasl.enabled.mechanisms={SCRAM}\n"
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
            "listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN\n"
            "listener.name.sasl_ssl.plain.sasl.jaas.config="
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};\n"
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n"
            f"super.users={SUPER_USERS}\n"
            "allow.everyone.if.no.acl.found=false\n"
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
            "log.flush.interval.ms=1000\n",
        )
        if not (data / "meta.properties").exists():
            cluster_id = new_cluster_id()
            say(f"kafka: formatting KRaft storage (cluster id {cluster_id})")
            if not format_storage(self.jvm(), cluster_id, props, self.log):
                raise Failure(f"kafka: formatting the storage failed; {self.log_hint()}")
        pid = spawn([*self.jvm(), "kafka.Kafka", str(props)], self.log, cwd=self.dir)
        self.generation_file.write_text(self.generation() + "\n")
        return pid

    async def check(self, url: str) -> None:
        await check_kafka(url)

    async def check_tls(self, url: str) -> None:
        await check_kafka(url, tls=True)
