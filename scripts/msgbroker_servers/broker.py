"""What every single server has in common: its folder, ports, pid file, TLS listener, health
checks, starting and stopping. One subclass per server (redis_server, nats_server, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable

from .common import HOST, RUN_DIR, Failure, rel, say
from .ports import choose_port, port_free, read_port
from .processes import Tracked, log_tail
from .tls import ca_fingerprint, ensure_tls_material


def quiet_client_logs() -> None:
    for name in ("aiokafka", "kafka", "aio_pika", "aiormq", "nats", "redis", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


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


class Broker:
    name: str
    default_port: int
    env_var: str
    tls_default_port: int
    tls_env_var: str
    start_timeout: float = 30.0
    stop_timeout: float = 20.0
    serves_tls: bool = True
    """False for a server without a TLS listener (nats-auth): the messages name none."""

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

    def config_stale(self) -> str | None:
        """Why our running server was started with another configuration than launch() writes
        now (Kafka: without its SASL listeners), so that `up` restarts it; None when it is current."""
        return None

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

    def extra_env(self) -> list[str]:
        """More lines for .brokers/env while our server runs (redis-auth: its users' URLs)."""
        return []

    async def after_ready(self) -> None:
        """Once `up` found our server answering: set up what lives in its data (RabbitMQ's
        tenants). Idempotent and quick when there is nothing to do; a Failure says why not."""

    def secrets(self) -> list[str]:
        """Passwords we generated for this server: never printed (see commands.print_env)."""
        return []

    def log_tail(self, lines: int = 8) -> str:
        return log_tail(self.log, lines)

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
        tls = f", TLS on {tls_port}" if self.serves_tls else ""
        say(f"starting {self.name} on {HOST}:{port}{tls} (log {rel(self.log)})")
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
