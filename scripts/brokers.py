#!/usr/bin/env python3
"""Real brokers on loopback: install, start, stop and break Redis, NATS JetStream, RabbitMQ
and Apache Kafka for this repository's tests.

Run it through ``scripts/brokers`` (which prepares the venv first); see docs/brokers.md.

Every server listens on 127.0.0.1 only and keeps everything it writes (config, data, log,
pid file, chosen ports) under ``.brokers/<name>/`` at the repository root; the Kafka jars are
kept in ``.cache/kafka/``. Both folders are ignored by git. Progress goes to stderr; the
``MSGBROKER_*`` settings of the servers that are up go to stdout and to ``.brokers/env``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".brokers"
CACHE_DIR = ROOT / ".cache" / "kafka"
ENV_FILE = RUN_DIR / "env"

KAFKA_VERSION = os.environ.get("MSGBROKER_BROKERS_KAFKA_VERSION", "4.1.2")
LOG4J_VERSION = "2.24.3"  # the log4j2 line Kafka 4.1 is built against
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
KAFKA_READY_TOPIC = "msgbroker-brokers-ready"
RABBITMQ_NODENAME = "msgbroker@localhost"
HOST = "127.0.0.1"

ALL = ("redis", "nats", "rabbitmq", "kafka")

# A throw-away test CA and one server certificate (127.0.0.1, localhost) for the TLS listeners.
TLS_DIR = RUN_DIR / "tls"
TLS_CA = TLS_DIR / "ca.pem"
TLS_CERT = TLS_DIR / "server.pem"
TLS_KEY = TLS_DIR / "server.key"
TLS_VALID_UNTIL = TLS_DIR / "valid_until"
TLS_CA_ENV = "MSGBROKER_TEST_TLS_CA_FILE"
TLS_DAYS = 3650
TLS_RENEW_BEFORE = 30 * 86400  # seconds of validity left below which the files are made again


class Failure(Exception):
    """A server could not be installed, started or reached; the message says which and why."""


def say(msg: str) -> None:
    print(f"brokers: {msg}", file=sys.stderr, flush=True)


def rel(path: Path) -> str:
    """A path as shown to people: relative to the repository root when inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- processes


def proc_info(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


class Tracked:
    """A process we started, remembered in a pid file as JSON {pid, start} so that a reused
    pid is never mistaken for ours."""

    def __init__(self, pid_file: Path):
        self.pid_file = pid_file

    def read(self) -> tuple[int, int] | None:
        try:
            data = json.loads(self.pid_file.read_text())
            return int(data["pid"]), int(data["start"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def record(self, pid: int) -> None:
        info = proc_info(pid)
        start = info[1] if info else 0
        self.pid_file.write_text(json.dumps({"pid": pid, "start": start}) + "\n")

    def pid(self) -> int | None:
        """The pid when the recorded process is still there (running or stopped), else None."""
        rec = self.read()
        if rec is None:
            return None
        pid, start = rec
        info = proc_info(pid)
        if info is None or info[0] in ("Z", "X") or info[1] != start:
            return None
        return pid

    def state(self) -> str | None:
        pid = self.pid()
        if pid is None:
            return None
        info = proc_info(pid)
        return info[0] if info else None

    def forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def signal(self, sig: int) -> bool:
        """Send sig to the process group we started (its own session); False when gone."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            os.kill(pid, sig)
        return True

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pid() is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self, timeout: float, what: str) -> None:
        """SIGTERM (then SIGKILL after timeout) and wait until the process is gone."""
        if self.pid() is None:
            self.forget()
            return
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)  # a paused server must wake up to see the SIGTERM
        if not self.wait_gone(timeout):
            say(f"{what} did not stop within {timeout:.0f}s of SIGTERM; sending SIGKILL")
            self.signal(signal.SIGKILL)
            if not self.wait_gone(10):
                raise Failure(f"{what} (pid {self.pid()}) survived SIGKILL")
        self.forget()


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Start a server detached in its own session, output appended to log; return its pid."""
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            close_fds=True,
        )
    return proc.pid


# --------------------------------------------------------------------------- ports


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def ports_remembered_elsewhere(key_file: Path) -> set[int]:
    """Ports remembered for our other servers and helpers: never hand one out twice."""
    taken: set[int] = set()
    if not RUN_DIR.is_dir():
        return taken
    for f in RUN_DIR.glob("*/*port"):
        if f == key_file:
            continue
        with contextlib.suppress(ValueError, OSError):
            taken.add(int(f.read_text().strip()))
    return taken


def choose_port(owner: str, key_file: Path, default: int, patience: float = 1.0) -> int:
    """The port remembered in key_file if it is (or soon becomes) free, else the standard
    port if free, else the next free one; remembered in key_file."""
    others = ports_remembered_elsewhere(key_file)
    remembered = None
    with contextlib.suppress(FileNotFoundError, ValueError):
        remembered = int(key_file.read_text().strip())
    if remembered is not None and remembered not in others:
        deadline = time.monotonic() + patience
        while True:
            if port_free(remembered):
                return remembered
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if remembered != default:
            say(f"{owner}: port {remembered} used last time is taken by another program; choosing another")
    port = default
    while port in others or not port_free(port):
        port += 1
        if port > 65535:
            raise Failure(f"{owner}: no free port from {default} up")
    if port != default:
        say(f"{owner}: standard port {default} is taken by another program; using {port}")
    key_file.write_text(f"{port}\n")
    return port


def read_port(key_file: Path) -> int | None:
    try:
        return int(key_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- installing


def have_root_or_sudo() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo", "-n"]
    raise Failure("installing Debian packages needs root (or sudo)")


_apt_updated = False


def apt_install(packages: list[str]) -> None:
    """apt-get install the packages, never leaving their own services running."""
    global _apt_updated
    if not packages:
        return
    if not shutil.which("apt-get"):
        raise Failure(f"please install {', '.join(packages)} (no apt-get on this machine)")
    sudo = have_root_or_sudo()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists() and not sudo:
        # Stop dpkg from starting the packages' own services: ours run with our config.
        policy.write_text("#!/bin/sh\n# written by msgbroker scripts/brokers during apt-get install\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    epmd_before = pids_named("epmd")
    try:
        t0 = time.monotonic()
        if not _apt_updated:
            say("apt-get update")
            subprocess.run([*sudo, "apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"],
                           env=env, check=True, stdout=sys.stderr)
            _apt_updated = True
        say(f"apt-get install {' '.join(packages)}")
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends",
             "-o", "DPkg::Lock::Timeout=300", *packages],
            env=env,
            check=True,
            stdout=sys.stderr,
        )
        say(f"installed {' '.join(packages)} in {time.monotonic() - t0:.0f}s")
    except subprocess.CalledProcessError as e:
        raise Failure(f"apt-get failed ({e}); install {' '.join(packages)} by hand") from None
    finally:
        if made_policy:
            policy.unlink()
    stop_system_services(packages, sudo)
    # Erlang's postinst leaves an `epmd -daemon` on 0.0.0.0:4369 behind; it is not ours to keep.
    for pid in pids_named("epmd") - epmd_before:
        say(f"stopping the epmd (pid {pid}) that the package installation left running")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)


def pids_named(comm: str) -> set[int]:
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == comm:
                    found.add(int(d.name))
    return found


def stop_system_services(packages: list[str], sudo: list[str]) -> None:
    """If dpkg started a package's own service anyway (no policy-rc.d honoured), stop it."""
    services = {"redis-server": "redis-server", "rabbitmq-server": "rabbitmq-server", "nats-server": "nats-server"}
    for pkg in packages:
        svc = services.get(pkg)
        if not svc:
            continue
        if Path("/run/systemd/system").is_dir():
            active = subprocess.run(["systemctl", "is-active", "--quiet", svc], check=False).returncode == 0
            if active:
                say(f"stopping the system service {svc} that the package started")
                subprocess.run([*sudo, "systemctl", "stop", svc], check=False)
        elif Path(f"/etc/init.d/{svc}").exists():
            running = subprocess.run(
                [*sudo, f"/etc/init.d/{svc}", "status"], check=False, capture_output=True
            ).returncode == 0
            if running:
                say(f"stopping the system service {svc} that the package started")
                subprocess.run([*sudo, f"/etc/init.d/{svc}", "stop"], check=False, capture_output=True)


# --------------------------------------------------------------------------- TLS test material

_OPENSSL_CONF = """\
# written by scripts/brokers: a throw-away test CA and a server certificate for loopback only
[req]
distinguished_name = dn
prompt = no
[dn]
CN = msgbroker throw-away test CA
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def tls_material_ready() -> bool:
    try:
        valid_until = float(TLS_VALID_UNTIL.read_text())
    except (FileNotFoundError, ValueError):
        return False
    files = all(f.is_file() for f in (TLS_CA, TLS_CERT, TLS_KEY))
    return files and valid_until - time.time() > TLS_RENEW_BEFORE


def ensure_tls_material() -> None:
    """Make the test CA and the server certificate with openssl, unless they are there and
    valid for another month. Written to a temporary folder first, so a half-made set is never used."""
    if tls_material_ready():
        return
    openssl = shutil.which("openssl")
    if not openssl:
        raise Failure("tls: openssl is missing (apt-get install openssl)")
    t0 = time.monotonic()
    tmp = TLS_DIR.with_name("tls.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    conf = tmp / "openssl.cnf"
    conf.write_text(_OPENSSL_CONF)
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    serial = str(secrets.randbits(63) | 1)
    steps = [
        [openssl, "req", "-x509", "-config", str(conf), "-extensions", "ca", *ec_key,
         "-keyout", "ca.key", "-out", "ca.pem", "-days", str(TLS_DAYS)],
        [openssl, "req", "-new", "-config", str(conf), *ec_key, "-subj", "/CN=localhost",
         "-keyout", "server.key", "-out", "server.csr"],
        [openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", serial,
         "-days", str(TLS_DAYS), "-extfile", str(conf), "-extensions", "server", "-out", "server.pem"],
    ]
    for argv in steps:
        res = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise Failure(f"tls: `openssl {argv[1]}` failed (exit {res.returncode}): {res.stderr.strip()[-400:]}")
    (tmp / "server.csr").unlink()
    (tmp / "valid_until").write_text(f"{time.time() + TLS_DAYS * 86400:.0f}\n")
    shutil.rmtree(TLS_DIR, ignore_errors=True)
    tmp.rename(TLS_DIR)
    say(f"tls: made a throw-away test CA and a server certificate for {HOST} and localhost in {rel(TLS_DIR)} "
        f"({time.monotonic() - t0:.1f}s)")


def ca_fingerprint() -> str:
    """Names the test CA in use, so that a server started with another one is noticed."""
    try:
        return hashlib.sha256(TLS_CA.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return ""


def tls_client_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(TLS_CA))


def pem_property(path: Path) -> str:
    """A PEM file as one Java properties value (its line breaks written as \\n)."""
    return path.read_text().strip().replace("\n", "\\n")


# --------------------------------------------------------------------------- health checks


def quiet_client_logs() -> None:
    for name in ("aiokafka", "kafka", "aio_pika", "aiormq", "nats", "redis", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


async def check_redis(url: str, tls: bool = False) -> None:
    import redis.asyncio as aioredis

    options: dict[str, object] = {"ssl_ca_certs": str(TLS_CA)} if tls else {}
    client = aioredis.from_url(url, socket_connect_timeout=2, socket_timeout=3, **options)
    try:
        if not await client.ping():
            raise Failure("PING did not answer PONG")
    finally:
        await client.aclose()


async def check_nats(url: str, tls: bool = False) -> None:
    import nats

    async def ignore(*_a: object) -> None:
        return None

    nc = await nats.connect(
        url,
        tls=tls_client_context() if tls else None,
        connect_timeout=2,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=ignore,
        disconnected_cb=ignore,
        closed_cb=ignore,
    )
    try:
        await nc.jetstream(timeout=3).account_info()
    finally:
        await nc.close()


async def check_rabbitmq(url: str, tls: bool = False) -> None:
    import aio_pika

    conn = await aio_pika.connect(url, timeout=3, ssl_context=tls_client_context() if tls else None)
    try:
        channel = await conn.channel()
        await channel.close()
    finally:
        await conn.close()


async def check_kafka(bootstrap: str, tls: bool = False) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

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


async def answers(check: Awaitable[None], timeout: float) -> tuple[bool, str]:
    """(True, "") when the check passes within timeout, else (False, why)."""
    try:
        await asyncio.wait_for(check, timeout)
        return True, ""
    except TimeoutError:
        return False, f"no answer within {timeout:.0f}s"
    except Exception as e:
        text = str(e).strip()
        kind = type(e).__name__
        return False, (text if text.startswith(kind) else f"{kind}: {text}".rstrip(": "))[:200]


# --------------------------------------------------------------------------- brokers


class Broker:
    name: str
    default_port: int
    env_var: str
    tls_default_port: int
    tls_env_var: str
    start_timeout: float = 30.0
    stop_timeout: float = 20.0

    def __init__(self) -> None:
        self.dir = RUN_DIR / self.name
        self.log = self.dir / f"{self.name}.log"
        self.port_file = self.dir / "port"
        self.tls_port_file = self.dir / "tls_port"
        self.tls_stamp_file = self.dir / "tls_ca"  # the test CA the running server was started with
        self.tls_log = self.log
        self.proc = Tracked(self.dir / "pid")

    # -- to be provided by each server
    def url(self, port: int) -> str:
        raise NotImplementedError

    def tls_url(self, port: int) -> str:
        raise NotImplementedError

    def missing_packages(self) -> list[str]:
        return []

    def install_other(self) -> None:
        """Anything installed some other way than apt (Kafka's jars)."""

    def choose_ports(self) -> int:
        return choose_port(self.name, self.port_file, self.default_port)

    def choose_tls_port(self, restarting: bool) -> int:
        # On restart the old process may take a moment to let go of the port it had.
        return choose_port(f"{self.name} (TLS)", self.tls_port_file, self.tls_default_port,
                           patience=10.0 if restarting else 1.0)

    def launch(self, port: int, tls_port: int) -> int:
        raise NotImplementedError

    async def check(self, url: str) -> None:
        raise NotImplementedError

    async def check_tls(self, url: str) -> None:
        raise NotImplementedError

    def after_stop(self) -> None:
        """Stop helper processes (RabbitMQ's epmd) once the server itself is gone."""

    def tls_alive(self) -> bool:
        """False when a separate TLS process (NATS) has exited."""
        return True

    def tls_stale(self) -> str | None:
        """Why our running server's TLS listener is not the one wanted; None when it is."""
        if self.tls_port() is None:
            return "it has no TLS listener (started by an older scripts/brokers)"
        with contextlib.suppress(FileNotFoundError):
            if self.tls_stamp_file.read_text().strip() == ca_fingerprint():
                return None
        return "its TLS certificate is not from the current test CA"

    def tls_renewal_is_cheap(self) -> bool:
        """Whether renew_tls leaves the server itself alone (so `up` may do it)."""
        return False

    def renew_tls(self) -> None:
        """Give the running server its TLS listener with the current certificate."""
        raise NotImplementedError

    # -- shared logic
    def port(self) -> int | None:
        return read_port(self.port_file)

    def tls_port(self) -> int | None:
        return read_port(self.tls_port_file)

    def own_tls_url(self) -> str | None:
        port = self.tls_port()
        return self.tls_url(port) if port else None

    def external_tls_url(self) -> str | None:
        """A TLS server of the user's own, when the test variable names one that is not ours."""
        value = os.environ.get(self.tls_env_var, "").strip()
        if not value or value == self.own_tls_url():
            return None
        return value

    def tls_served(self) -> bool:
        """Our server is running with a TLS listener made from the current test CA."""
        return not self.external_url() and self.proc.pid() is not None and self.tls_stale() is None

    def own_url(self) -> str | None:
        port = self.port()
        return self.url(port) if port else None

    def external_url(self) -> str | None:
        """The user's own server, when MSGBROKER_* names one that is not ours."""
        value = os.environ.get(self.env_var, "").strip()
        if not value or value == self.own_url():
            return None
        return value

    def current_url(self) -> str | None:
        return self.external_url() or self.own_url()

    def env_line(self, url: str) -> str:
        return f"{self.env_var}={url}"

    def log_tail(self, lines: int = 8) -> str:
        try:
            with open(self.log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 8192))
                tail = fh.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "".join(f"\n    | {line}" for line in tail)

    def log_hint(self) -> str:
        return f"see its log {rel(self.log)} (scripts/brokers logs {self.name})"

    async def healthy(self, url: str | None = None, timeout: float = 5.0) -> tuple[bool, str]:
        url = url or self.current_url()
        if not url:
            return False, "no port chosen yet"
        return await answers(self.check(url), timeout)

    async def tls_healthy(self, timeout: float = 5.0) -> tuple[bool, str]:
        """Whether our TLS listener answers a client that trusts the test CA."""
        url = self.own_tls_url()
        if not url:
            return False, "no TLS port chosen yet"
        ok, why = await answers(self.check_tls(url), timeout)
        return ok, ("" if ok else f"TLS port {self.tls_port()}: {why}")

    async def all_healthy(self, timeout: float = 5.0) -> tuple[bool, str]:
        """Our server answers on its plain port and on its TLS port."""
        ok, why = await self.healthy(timeout=timeout)
        if ok:
            ok, why = await self.tls_healthy(timeout)
        return ok, why

    async def wait_healthy(self, timeout: float, url: str | None = None, watch_process: bool = True) -> None:
        url = url or self.current_url()
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if watch_process and not self.external_url():
                if self.proc.pid() is None:
                    raise Failure(f"{self.name} exited while starting; {self.log_hint()}{self.log_tail()}")
                if self.proc.state() in ("T", "t"):
                    raise Failure(f"{self.name} is paused (SIGSTOP); run: scripts/brokers resume {self.name}")
            remaining = deadline - time.monotonic()
            ok, last = await self.healthy(url, timeout=max(1.0, min(5.0, remaining)))
            if ok and not self.external_url():
                if watch_process and not self.tls_alive():
                    raise Failure(f"{self.name}: its TLS server exited while starting; see its log "
                                  f"{rel(self.tls_log)}")
                if self.tls_stale() is None:  # else up has said why it has no TLS listener
                    ok, last = await self.tls_healthy(timeout=max(1.0, min(5.0, remaining)))
            if ok:
                return
            if time.monotonic() >= deadline:
                if self.external_url():
                    raise Failure(f"{self.name}: your server at {url} did not answer within {timeout:.0f}s "
                                  f"(last error: {last}); check {self.env_var}")
                raise Failure(f"{self.name} did not answer within {timeout:.0f}s (last error: {last}); "
                              f"{self.log_hint()}; it is left running (pid {self.proc.pid()}): "
                              f"scripts/brokers down {self.name} stops it")
            await asyncio.sleep(0.25)

    def start(self, port: int | None = None) -> None:
        """Start our server (not waiting for it): on the given port, else a chosen one; its TLS
        listener on the port it had, else a chosen one."""
        ensure_tls_material()
        self.dir.mkdir(parents=True, exist_ok=True)
        restarting = port is not None
        if port is None:
            port = self.choose_ports()
        else:
            deadline = time.monotonic() + 10
            while not port_free(port):
                if time.monotonic() > deadline:
                    raise Failure(f"{self.name}: port {port} is still taken; cannot restart on it")
                time.sleep(0.2)
        tls_port = self.choose_tls_port(restarting)
        say(f"starting {self.name} on {HOST}:{port}, TLS on {tls_port} (log {rel(self.log)})")
        pid = self.launch(port, tls_port)
        self.proc.record(pid)
        self.tls_stamp_file.write_text(ca_fingerprint() + "\n")

    def stop(self) -> bool:
        if self.proc.pid() is None:
            self.proc.forget()
            self.after_stop()
            return False
        say(f"stopping {self.name} (pid {self.proc.pid()})")
        self.proc.stop(self.stop_timeout, self.name)
        self.after_stop()
        return True


class Redis(Broker):
    name = "redis"
    default_port = 6379
    env_var = "MSGBROKER_REDIS__URL"
    tls_default_port = 6390
    tls_env_var = "MSGBROKER_TEST_REDIS_TLS_URL"
    start_timeout = 20.0

    def url(self, port: int) -> str:
        return f"redis://{HOST}:{port}"

    def tls_url(self, port: int) -> str:
        return f"rediss://{HOST}:{port}"

    def missing_packages(self) -> list[str]:
        return [] if shutil.which("redis-server") else ["redis-server"]

    def launch(self, port: int, tls_port: int) -> int:
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text(
            "# written by scripts/brokers; rewritten at every start\n"
            f"bind {HOST}\n"
            f"port {port}\n"
            "protected-mode yes\n"
            "daemonize no\n"
            'logfile ""\n'
            f"dir {data}\n"
            "appendonly yes\n"
            "appendfsync everysec\n"
            "save 60 1\n"
            # the same server also speaks TLS on its own port; clients need no certificate
            f"tls-port {tls_port}\n"
            f"tls-cert-file {TLS_CERT}\n"
            f"tls-key-file {TLS_KEY}\n"
            f"tls-ca-cert-file {TLS_CA}\n"
            "tls-auth-clients no\n"
        )
        return spawn([shutil.which("redis-server") or "redis-server", str(conf)], self.log)

    async def check(self, url: str) -> None:
        await check_redis(url)

    async def check_tls(self, url: str) -> None:
        await check_redis(url, tls=True)


class Nats(Broker):
    name = "nats"
    default_port = 4222
    env_var = "MSGBROKER_NATS__URL"
    tls_default_port = 4232
    tls_env_var = "MSGBROKER_TEST_NATS_TLS_URL"
    start_timeout = 20.0

    def __init__(self) -> None:
        super().__init__()
        # nats-server 2.9 either requires TLS of every client on a port or (allow_non_tls) lets
        # nats-py stay in plaintext even for tls:// URLs; so TLS gets a second, small server.
        self.tls_proc = Tracked(self.dir / "tls.pid")
        self.tls_log = self.dir / "nats-tls.log"

    def url(self, port: int) -> str:
        return f"nats://{HOST}:{port}"

    def tls_url(self, port: int) -> str:
        return f"tls://{HOST}:{port}"

    def missing_packages(self) -> list[str]:
        return [] if shutil.which("nats-server") else ["nats-server"]

    def choose_tls_port(self, restarting: bool) -> int:
        port = self.tls_port()
        if port and self.tls_proc.pid() is not None:
            if self.tls_stale() is None:
                return port  # the TLS server outlived the main one (kill nats): keep it
            self.stop_tls_server()  # made with another test CA: its port is free again below
            restarting = True
        return super().choose_tls_port(restarting)

    def launch(self, port: int, tls_port: int) -> int:
        store = self.dir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        argv = [
            shutil.which("nats-server") or "nats-server",
            "-a", HOST, "-p", str(port), "-n", "msgbroker-nats",
            "-js", "-sd", str(store),
        ]
        pid = spawn(argv, self.log)
        if self.tls_proc.pid() is None:
            self.start_tls_server(tls_port)
        return pid

    def start_tls_server(self, tls_port: int) -> None:
        self.stop_tls_server()
        store = self.dir / "jetstream-tls"
        store.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nats-tls.conf"
        conf.write_text(
            "# written by scripts/brokers; rewritten at every start: JetStream for the TLS tests\n"
            "server_name: msgbroker-nats-tls\n"
            f"listen: {HOST}:{tls_port}\n"
            f'jetstream {{\n  store_dir: "{store}"\n  max_memory_store: 256MB\n  max_file_store: 1GB\n}}\n'
            f'tls {{\n  cert_file: "{TLS_CERT}"\n  key_file: "{TLS_KEY}"\n  timeout: 2\n}}\n'
        )
        say(f"starting nats's TLS server on {HOST}:{tls_port} (log {rel(self.tls_log)})")
        self.tls_proc.record(spawn([shutil.which("nats-server") or "nats-server", "-c", str(conf)], self.tls_log))
        self.tls_stamp_file.write_text(ca_fingerprint() + "\n")

    def tls_alive(self) -> bool:
        return self.tls_proc.pid() is not None

    def tls_stale(self) -> str | None:
        stale = super().tls_stale()
        if stale is None and self.tls_proc.pid() is None:
            return "its TLS server is not running"
        return stale

    def tls_renewal_is_cheap(self) -> bool:
        return True  # a separate process: the plain server keeps running

    def renew_tls(self) -> None:
        self.start_tls_server(self.choose_tls_port(restarting=True))

    def stop_tls_server(self) -> None:
        if self.tls_proc.pid() is not None:
            say(f"stopping nats's TLS server (pid {self.tls_proc.pid()})")
        self.tls_proc.stop(10, "nats's TLS server")

    def after_stop(self) -> None:
        self.stop_tls_server()

    async def check(self, url: str) -> None:
        await check_nats(url)

    async def check_tls(self, url: str) -> None:
        await check_nats(url, tls=True)


class RabbitMQ(Broker):
    name = "rabbitmq"
    default_port = 5672
    env_var = "MSGBROKER_RABBITMQ__URL"
    tls_default_port = 5671  # the registered amqps port
    tls_env_var = "MSGBROKER_TEST_RABBITMQ_TLS_URL"
    start_timeout = 90.0
    stop_timeout = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.epmd = Tracked(self.dir / "epmd.pid")
        self.epmd_port_file = self.dir / "epmd_port"
        self.dist_port_file = self.dir / "dist_port"

    def url(self, port: int) -> str:
        return f"amqp://guest:guest@{HOST}:{port}/"

    def tls_url(self, port: int) -> str:
        return f"amqps://guest:guest@{HOST}:{port}/"

    @staticmethod
    def server_script() -> str | None:
        for cand in ("/usr/lib/rabbitmq/bin/rabbitmq-server",):
            if os.access(cand, os.X_OK):
                return cand
        return shutil.which("rabbitmq-server")

    def missing_packages(self) -> list[str]:
        return [] if self.server_script() and shutil.which("epmd") else ["rabbitmq-server"]

    def start_epmd(self) -> int:
        """Our own epmd (Erlang's port mapper), tracked so that `down` can stop it too."""
        port = read_port(self.epmd_port_file)
        if self.epmd.pid() is not None and port:
            return port
        port = choose_port(self.name, self.epmd_port_file, 4369)
        pid = spawn(
            [shutil.which("epmd") or "epmd", "-address", HOST, "-port", str(port)],
            self.dir / "epmd.log",
        )
        self.epmd.record(pid)
        deadline = time.monotonic() + 10
        while port_free(port):
            if self.epmd.pid() is None or time.monotonic() > deadline:
                raise Failure(f"rabbitmq: epmd did not start; see {rel(self.dir / 'epmd.log')}")
            time.sleep(0.05)
        return port

    def launch(self, port: int, tls_port: int) -> int:
        epmd_port = self.start_epmd()
        dist_port = choose_port(self.name, self.dist_port_file, 25672)
        home = self.dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)
        (self.dir / "mnesia").mkdir(exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        conf = self.dir / "rabbitmq.conf"
        conf.write_text(
            "# written by scripts/brokers; rewritten at every start\n"
            f"listeners.tcp.default = {HOST}:{port}\n"
            "loopback_users.guest = true\n"
            "log.console = true\n"
            "log.console.level = info\n"
            "log.file = false\n"
            f"distribution.listener.interface = {HOST}\n"
            f"distribution.listener.port_range.min = {dist_port}\n"
            f"distribution.listener.port_range.max = {dist_port}\n"
            f"listeners.ssl.default = {HOST}:{tls_port}\n"
            f"ssl_options.cacertfile = {TLS_CA}\n"
            f"ssl_options.certfile = {TLS_CERT}\n"
            f"ssl_options.keyfile = {TLS_KEY}\n"
            "ssl_options.verify = verify_none\n"  # clients present no certificate
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("# intentionally empty: settings come from scripts/brokers\n")
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_", "NOTIFY_SOCKET"))
        }
        env.update(
            HOME=str(home),
            RUNNING_UNDER_SYSTEMD="true",  # makes rabbitmq-server exec the Erlang VM (one process)
            RABBITMQ_NODENAME=RABBITMQ_NODENAME,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(port),
            RABBITMQ_DIST_PORT=str(dist_port),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(conf),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "logs"),
            RABBITMQ_LOGS="-",
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            ERL_EPMD_ADDRESS=HOST,
            ERL_EPMD_PORT=str(epmd_port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-start_epmd false",
        )
        return spawn([self.server_script() or "rabbitmq-server"], self.log, env=env, cwd=self.dir)

    def after_stop(self) -> None:
        if self.epmd.pid() is not None:
            self.epmd.stop(5, "rabbitmq's epmd")
        self.epmd.forget()

    async def check(self, url: str) -> None:
        await check_rabbitmq(url)

    async def check_tls(self, url: str) -> None:
        await check_rabbitmq(url, tls=True)


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
        home = os.environ.get("JAVA_HOME")
        if home and os.access(Path(home) / "bin" / "java", os.X_OK):
            return str(Path(home) / "bin" / "java")
        return shutil.which("java")

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
        return [
            self.java() or "java",
            "-Xmx512m", "-Xms128m",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp", f"{self.lib}/*",
        ]

    def launch(self, port: int, tls_port: int) -> int:
        cport = choose_port(self.name, self.controller_port_file, 9093)
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        (self.dir / "log4j2.properties").write_text(
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
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            say(f"kafka: formatting KRaft storage (cluster id {cluster_id})")
            with open(self.log, "ab") as out:
                res = subprocess.run(
                    [*self.jvm(), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False,
                )
            if res.returncode != 0:
                raise Failure(f"kafka: formatting the storage failed; {self.log_hint()}")
        return spawn([*self.jvm(), "kafka.Kafka", str(props)], self.log, cwd=self.dir)

    async def check(self, url: str) -> None:
        await check_kafka(url)

    async def check_tls(self, url: str) -> None:
        await check_kafka(url, tls=True)


BROKERS: dict[str, Broker] = {b.name: b for b in (Redis(), Nats(), RabbitMQ(), Kafka())}


# --------------------------------------------------------------------------- commands


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One changing command at a time (two test runs may call `up` together). The lock is
    taken on this script itself, which `rm -rf .brokers` cannot pull away from under a holder."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(__file__, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            say("waiting for another scripts/brokers command to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def env_lines(brokers: list[Broker]) -> list[str]:
    """MSGBROKER_* lines of the servers that are up (ours or the user's): the plain address,
    the TLS one, and the test CA when a TLS listener of ours is among them."""
    lines: list[str] = []
    ours_tls = False
    for b in brokers:
        url = b.external_url() or (b.own_url() if b.proc.pid() is not None else None)
        if url:
            lines.append(b.env_line(url))
        tls_url = b.external_tls_url()
        if not tls_url and b.tls_served():
            tls_url = b.own_tls_url()
            ours_tls = True
        if tls_url:
            lines.append(f"{b.tls_env_var}={tls_url}")
    ca = os.environ.get(TLS_CA_ENV, "").strip() or (str(TLS_CA) if ours_tls else "")
    if ca:
        lines.append(f"{TLS_CA_ENV}={ca}")
    return lines


@contextlib.contextmanager
def addresses_as_up_left_them() -> Iterator[None]:
    """Take the MSGBROKER_* addresses from .brokers/env instead of the caller's environment.

    `restart`, `kill`, `pause`, `resume` and `down` act on our own servers only. A test run whose
    shell names other servers (another checkout's) calls them too, and the file must not end up
    naming those servers for everybody who loads it next."""
    names = {TLS_CA_ENV} | {v for b in BROKERS.values() for v in (b.env_var, b.tls_env_var)}
    recorded: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in ENV_FILE.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key in names:
                recorded[key] = value
    caller = {k: os.environ[k] for k in names if k in os.environ}
    for k in names:
        os.environ.pop(k, None)
    os.environ.update(recorded)
    try:
        yield
    finally:
        for k in names:
            os.environ.pop(k, None)
        os.environ.update(caller)


def write_env_file() -> None:
    lines = env_lines(list(BROKERS.values()))
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = ENV_FILE.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(ENV_FILE)


def ensure_installed(brokers: list[Broker]) -> None:
    packages: list[str] = [] if not brokers or shutil.which("openssl") else ["openssl"]  # the TLS test CA
    for b in brokers:
        for p in b.missing_packages():
            if p not in packages:
                packages.append(p)
    apt_install(packages)
    for b in brokers:
        b.install_other()
        missing = b.missing_packages()
        if missing:
            raise Failure(f"{b.name}: still missing after install: {', '.join(missing)}")


async def bring_up(brokers: list[Broker]) -> dict[str, str]:
    """Start what is not running, wait for everything to answer; return {name: failure}."""
    waits: list[tuple[Broker, float, bool]] = []
    failures: dict[str, str] = {}
    if any(not b.external_url() for b in brokers):
        try:
            ensure_tls_material()
        except Failure as e:
            return {b.name: str(e) for b in brokers}
    running = [b for b in brokers if not b.external_url() and b.proc.state() not in (None, "T", "t")]
    checks = await asyncio.gather(*(b.healthy(timeout=5.0) if b.tls_stale() else b.all_healthy(timeout=5.0)
                                    for b in running))
    healthy = {b.name for b, (ok, _) in zip(running, checks, strict=True) if ok}
    for b in brokers:
        ext = b.external_url()
        if ext:
            say(f"{b.name}: using your own server {ext} ({b.env_var} is set); checking it answers")
            waits.append((b, min(15.0, b.start_timeout), False))
            continue
        if b.proc.pid() is not None:
            if b.proc.state() in ("T", "t"):
                failures[b.name] = f"{b.name} is paused (SIGSTOP); run: scripts/brokers resume {b.name}"
                continue
            stale = b.tls_stale()
            if stale and b.tls_renewal_is_cheap():
                say(f"{b.name}: running, but {stale}; starting it")
                try:
                    b.renew_tls()
                except Failure as e:
                    failures[b.name] = str(e)
                    continue
                waits.append((b, b.start_timeout, True))
                continue
            if stale:
                # Never restart a running server behind the back of tests that use it.
                say(f"{b.name}: WARNING: running, but {stale}, so {b.tls_env_var} is left out; "
                    f"`scripts/brokers restart {b.name}` restarts it with one (keeping its data)")
            if b.name in healthy:
                tls = "" if stale else f", TLS on {b.tls_port()}"
                say(f"{b.name}: already running and healthy on port {b.port()}{tls}")
                continue
            say(f"{b.name}: running (pid {b.proc.pid()}) but not answering yet; waiting")
            waits.append((b, b.start_timeout, True))
            continue
        try:
            b.start()
        except Failure as e:
            failures[b.name] = str(e)
            continue
        waits.append((b, b.start_timeout, True))

    failures.update(await await_ready(waits))
    return failures


async def await_ready(waits: list[tuple[Broker, float, bool]]) -> dict[str, str]:
    """Wait for each (broker, timeout, watch its process) in parallel; return {name: failure}."""

    async def one(b: Broker, timeout: float, watch: bool) -> str | None:
        t0 = time.monotonic()
        try:
            await b.wait_healthy(timeout, watch_process=watch)
        except Failure as e:
            return str(e)
        tls = "" if b.external_url() or b.tls_stale() else f", TLS on {b.own_tls_url()}"
        say(f"{b.name}: ready on {b.current_url()}{tls} after {time.monotonic() - t0:.1f}s")
        return None

    results = await asyncio.gather(*(one(*w) for w in waits))
    return {b.name: r for (b, _, _), r in zip(waits, results, strict=True) if r}


def names_arg(names: list[str]) -> list[Broker]:
    return [BROKERS[n] for n in (names or ALL)]


def print_env(brokers: list[Broker]) -> None:
    for line in env_lines(brokers):
        print(line, flush=True)


def cmd_up(names: list[str]) -> int:
    brokers = names_arg(names)
    t0 = time.monotonic()
    with locked():
        try:
            ensure_installed([b for b in brokers if not b.external_url()])
        except Failure as e:
            say(f"ERROR: {e}")
            return 1
        failures = asyncio.run(bring_up(brokers))
        write_env_file()
    print_env([b for b in brokers if b.name not in failures])
    for f in failures.values():
        say(f"ERROR: {f}")
    if failures:
        return 1
    say(f"up: {', '.join(b.name for b in brokers)} ready in {time.monotonic() - t0:.1f}s; "
        f"settings in {rel(ENV_FILE)} (set -a; . {rel(ENV_FILE)}; set +a)")
    return 0


def cmd_down(names: list[str]) -> int:
    brokers = names_arg(names)
    with locked():
        for b in brokers:
            if b.external_url() and b.proc.pid() is None:
                say(f"{b.name}: your own server ({b.env_var}) is left alone")
                continue
            if not b.stop():
                say(f"{b.name}: not running")
        write_env_file()
    return 0


async def gather_status() -> list[tuple[str, ...]]:
    async def row(b: Broker) -> tuple[str, ...]:
        ext = b.external_url()
        pid = b.proc.pid()
        if ext and pid is None:
            ok, why = await b.healthy(ext, timeout=3.0)
            return (b.name, "external", "-", ext, b.external_tls_url() or "-",
                    "yes" if ok else f"no ({why[:60]})", "-")
        port = b.port()
        tls = str(b.tls_port() or "-")
        if pid is None:
            return (b.name, "stopped", "-", str(port or "-"), tls, "-", rel(b.log))
        state = {"T": "paused", "t": "paused"}.get(b.proc.state() or "", "running")
        stale = b.tls_stale()
        if state == "paused":
            healthy = "no (paused)"
        elif stale:
            tls = "-"
            ok, why = await b.healthy(timeout=3.0)
            healthy = f"{'yes' if ok else f'no ({why[:60]})'}; but {stale}: scripts/brokers restart {b.name}"
        else:
            ok, why = await b.all_healthy(timeout=3.0)
            healthy = "yes" if ok else f"no ({why[:60]})"
        return (b.name, state, str(pid), str(port or "-"), tls, healthy, rel(b.log))

    return list(await asyncio.gather(*(row(b) for b in BROKERS.values())))


def cmd_status() -> int:
    rows = [("NAME", "STATE", "PID", "PORT", "TLS PORT", "HEALTHY", "LOG"), *asyncio.run(gather_status())]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=False)) + "  " + r[6])
    return 0


def cmd_logs(name: str, lines: int, follow: bool) -> int:
    b = BROKERS[name]
    if not b.log.exists():
        say(f"{name}: no log yet ({rel(b.log)})")
        return 1
    argv = ["tail", "-n", str(lines)] + (["-F"] if follow else []) + [str(b.log)]
    os.execvp("tail", argv)
    return 0


def ours(b: Broker, action: str) -> bool:
    if b.external_url() and b.proc.pid() is None:
        say(f"{b.name}: {action} only acts on servers started by scripts/brokers; "
            f"{b.env_var} points at your own server")
        return False
    return True


def cmd_restart(names: list[str]) -> int:
    requested = names_arg(names)
    brokers = [b for b in requested if ours(b, "restart")]
    failures: dict[str, str] = {b.name: "not ours" for b in requested if b not in brokers}
    with locked():
        ensure_installed(brokers)
        for b in brokers:
            port = b.port()
            b.stop()
            try:
                b.start(port)
            except Failure as e:
                failures[b.name] = str(e)
        waits = [(b, b.start_timeout, True) for b in brokers if b.name not in failures]
        failures.update(asyncio.run(await_ready(waits)))
        write_env_file()
    print_env([b for b in brokers if b.name not in failures])
    for _name, f in failures.items():
        if f != "not ours":
            say(f"ERROR: {f}")
    return 1 if failures else 0


def cmd_signal(names: list[str], sig: int, verb: str) -> int:
    rc = 0
    with locked():
        for b in names_arg(names):
            if not ours(b, verb):
                rc = 1
                continue
            pid = b.proc.pid()
            if pid is None:
                say(f"{b.name}: not running")
                rc = 1
                continue
            b.proc.signal(sig)
            if sig == signal.SIGKILL:
                if not b.proc.wait_gone(10):
                    say(f"{b.name}: pid {pid} still there after SIGKILL")
                    rc = 1
                    continue
                b.proc.forget()
                say(f"{b.name}: killed (pid {pid}); start it again with: scripts/brokers up {b.name}")
            elif sig == signal.SIGSTOP:
                deadline = time.monotonic() + 5
                while b.proc.state() not in ("T", "t") and time.monotonic() < deadline:
                    time.sleep(0.02)
                say(f"{b.name}: paused (pid {pid}); wake it with: scripts/brokers resume {b.name}")
            else:
                say(f"{b.name}: resumed (pid {pid})")
        write_env_file()
    return rc


def cmd_wait(names: list[str], timeout: float | None) -> int:
    brokers = names_arg(names)

    async def run() -> list[str]:
        async def one(b: Broker) -> str | None:
            if b.proc.pid() is None and not b.external_url():
                return f"{b.name} is not running; start it with: scripts/brokers up {b.name}"
            t = timeout if timeout is not None else b.start_timeout
            deadline = time.monotonic() + t
            last = ""
            while True:
                ok, last = await b.healthy(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
                if ok:
                    return None
                if not b.external_url() and b.proc.pid() is None:
                    return f"{b.name} exited; {b.log_hint()}"
                if time.monotonic() >= deadline:
                    extra = " (it is paused: scripts/brokers resume)" if b.proc.state() in ("T", "t") else ""
                    return f"{b.name} not healthy after {t:.0f}s{extra} (last error: {last}); {b.log_hint()}"
                await asyncio.sleep(0.2)

        return [r for r in await asyncio.gather(*(one(b) for b in brokers)) if r]

    t0 = time.monotonic()
    failures = asyncio.run(run())
    for f in failures:
        say(f"ERROR: {f}")
    if not failures:
        say(f"{', '.join(b.name for b in brokers)} healthy ({time.monotonic() - t0:.1f}s)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    quiet_client_logs()
    parser = argparse.ArgumentParser(
        prog="scripts/brokers",
        description="Real Redis, NATS JetStream, RabbitMQ and Kafka on 127.0.0.1 for tests (docs/brokers.md).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    names = {"nargs": "*", "metavar": "NAME", "help": f"any of {', '.join(ALL)}; default all"}
    one = {"choices": ALL, "metavar": "NAME", "help": f"one of {', '.join(ALL)}"}
    timeout_help = "seconds to wait for each server (default: 20 for redis/nats, 90 for rabbitmq/kafka)"
    p = sub.add_parser("up", help="install what is missing, start what is not running, wait until all answer")
    p.add_argument("names", **names)
    p.add_argument("--timeout", type=float, default=None, help=timeout_help)
    sub.add_parser("down", help="stop the servers this script started").add_argument("names", **names)
    sub.add_parser("status", help="show each server: state, pid, port, health")
    p = sub.add_parser("logs", help="show the end of a server's log")
    p.add_argument("name", **one)
    p.add_argument("-n", "--lines", type=int, default=200)
    p.add_argument("-f", "--follow", action="store_true")
    p = sub.add_parser("restart", help="stop and start again on the same port, keeping data")
    p.add_argument("names", **names)
    p.add_argument("--timeout", type=float, default=None, help=timeout_help)
    sub.add_parser("kill", help="kill -9 (start again with up)").add_argument("names", **names)
    sub.add_parser("pause", help="SIGSTOP: the server hangs without closing connections").add_argument("names", **names)
    sub.add_parser("resume", help="SIGCONT after pause").add_argument("names", **names)
    p = sub.add_parser("wait", help="wait until healthy (after resume or restart)")
    p.add_argument("names", **names)
    p.add_argument("--timeout", type=float, default=None, help=timeout_help)
    args = parser.parse_args(argv)
    if args.cmd in ("up", "restart") and args.timeout is not None:
        for b in BROKERS.values():
            b.start_timeout = args.timeout
    for n in getattr(args, "names", []):
        if n not in ALL:
            parser.error(f"unknown server {n!r}: choose from {', '.join(ALL)}")
    try:
        if args.cmd == "up":
            return cmd_up(args.names)
        if args.cmd == "status":
            return cmd_status()
        if args.cmd == "logs":
            return cmd_logs(args.name, args.lines, args.follow)
        with addresses_as_up_left_them():  # these act on our servers only
            if args.cmd == "down":
                return cmd_down(args.names)
            if args.cmd == "restart":
                return cmd_restart(args.names)
            if args.cmd == "kill":
                return cmd_signal(args.names, signal.SIGKILL, "kill")
            if args.cmd == "pause":
                return cmd_signal(args.names, signal.SIGSTOP, "pause")
            if args.cmd == "resume":
                return cmd_signal(args.names, signal.SIGCONT, "resume")
        if args.cmd == "wait":
            return cmd_wait(args.names, args.timeout)
    except Failure as e:
        say(f"ERROR: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
