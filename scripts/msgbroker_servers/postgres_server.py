"""PostgreSQL from Debian's package, for the outbox and inbox (plugins/outbox, docs/outbox.md): a
cluster of its own under .brokers/postgres/data on its own port, TCP on 127.0.0.1 only (no Unix
socket), logins without a password (``trust``, like the open Redis and NATS: anyone on this
machine may connect). Run as the ``postgres`` user when we are root (the server refuses root).
A role ``msgbroker`` (CREATEDB) owning a database ``msgbroker_test`` is made once the server
answers. No TLS listener."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .broker import Broker
from .common import HOST, ROOT, Failure, rel, say
from .processes import proc_info

SUPERUSER = "postgres"
TEST_USER = "msgbroker"
TEST_DATABASE = "msgbroker_test"


def postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding a server (Debian's layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) of the ``postgres`` user when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise Failure("postgres: running as root needs the 'postgres' user (Debian's postgresql "
                      "package makes it); the server refuses to run as root") from None
    return entry.pw_uid, entry.pw_gid


async def check_postgres(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=3)
    try:
        if await conn.fetchval("SELECT 1") != 1:
            raise Failure("SELECT 1 did not answer 1")
    finally:
        await conn.close()


class Postgres(Broker):
    name = "postgres"
    default_port = 5432
    env_var = "MSGBROKER_TEST_POSTGRES_URL"
    tls_default_port = 0
    tls_env_var = "MSGBROKER_TEST_POSTGRES_TLS_URL"  # never written: no TLS listener
    serves_tls = False
    start_timeout = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.data = self.dir / "data"

    def admin_url(self, port: int | None = None) -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{port or self.port()}/postgres"

    # -- the server

    def url(self, port: int) -> str:
        return f"postgresql://{TEST_USER}@{HOST}:{port}/{TEST_DATABASE}"

    def tls_url(self, port: int) -> str:
        return ""

    def missing_packages(self) -> list[str]:
        return [] if postgres_bindir() else ["postgresql"]

    def _initdb(self, bindir: Path, owner: tuple[int, int] | None) -> None:
        """A new cluster in .brokers/postgres/data, owned by the user that runs the server."""
        say(f"postgres: initdb {rel(self.data)}")
        self.data.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(self.data, *owner)
        os.chmod(self.data, 0o700)
        done = subprocess.run(
            [str(bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
             "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            capture_output=True, text=True, check=False, timeout=120,
            user=owner[0] if owner else None, group=owner[1] if owner else None,
            extra_groups=[] if owner else None,
        )
        if done.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            raise Failure(f"postgres: initdb exited {done.returncode}: {(done.stderr or done.stdout).strip()[-600:]}")

    def _choose_data_dir(self, owner: tuple[int, int] | None) -> None:
        """.brokers/postgres/data, unless the user that runs the server cannot enter a folder
        above it (a checkout under /root, mode 700): then a folder of this checkout's own in
        /var/tmp (named by a hash of the checkout's path), remembered in .brokers/postgres/datadir."""
        self.data = self.dir / "data"
        if owner is None:
            return
        blocked = next((parent for parent in self.data.resolve().parents
                        if not parent.stat().st_mode & 0o001 and parent.stat().st_uid != owner[0]), None)
        if blocked is None:
            return
        digest = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
        self.data = Path("/var/tmp") / f"msgbroker-postgres-{digest}" / "data"
        self.data.parent.mkdir(mode=0o755, exist_ok=True)
        say(f"postgres: the postgres user cannot enter {blocked} (mode {blocked.stat().st_mode & 0o777:o}); "
            f"its data directory is {self.data} instead")
        (self.dir / "datadir").write_text(f"{self.data}\n")

    def _forget_dead_postmaster(self) -> None:
        """Remove the lock file of a postmaster killed with -9 once it is gone or a zombie: the
        server takes a zombie's pid for another postmaster and refuses to start."""
        lock = self.data / "postmaster.pid"
        try:
            pid = int(lock.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return
        info = proc_info(pid)
        if info is None or info[0] in ("Z", "X"):
            say(f"postgres: removing the lock file of the postmaster (pid {pid}) that was killed")
            lock.unlink(missing_ok=True)

    def launch(self, port: int, tls_port: int) -> int:
        bindir = postgres_bindir()
        if bindir is None:
            raise Failure("postgres: no /usr/lib/postgresql/*/bin/postgres (install Debian's postgresql)")
        owner = _run_as()
        self._choose_data_dir(owner)
        if not (self.data / "PG_VERSION").exists():
            if self.data.exists():
                shutil.rmtree(self.data)
            self._initdb(bindir, owner)
        self._forget_dead_postmaster()
        argv = [
            str(bindir / "postgres"), "-D", str(self.data),
            "-c", f"listen_addresses={HOST}", "-c", f"port={port}",
            "-c", "unix_socket_directories=",   # TCP only: no socket path whose length could matter
            "-c", "max_connections=200", "-c", "shared_buffers=64MB",
            "-c", "logging_collector=off", "-c", "log_min_messages=warning",
        ]
        with open(self.log, "ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
                user=owner[0] if owner else None, group=owner[1] if owner else None,
                extra_groups=[] if owner else None,
            )
        return proc.pid

    def stop(self) -> bool:
        """A fast shutdown (SIGINT: clients are disconnected) rather than the smart one SIGTERM
        asks for, which waits for every client to leave."""
        pid = self.proc.pid()
        if pid is not None:
            say(f"stopping {self.name} (pid {pid})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGINT)
            if self.proc.wait_gone(self.stop_timeout):
                self.proc.forget()
                return True
        return super().stop()

    async def after_ready(self) -> None:
        """The test role and database, made when missing (quick when they exist)."""
        import asyncpg

        conn = await asyncpg.connect(self.admin_url(), timeout=5)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", TEST_USER):
                say(f"postgres: creating role {TEST_USER} and database {TEST_DATABASE}")
                await conn.execute(f"CREATE ROLE {TEST_USER} LOGIN CREATEDB")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", TEST_DATABASE):
                await conn.execute(f"CREATE DATABASE {TEST_DATABASE} OWNER {TEST_USER}")
        finally:
            await conn.close()

    # -- no TLS listener

    def choose_tls_port(self, restarting: bool) -> int:
        return 0

    def tls_port(self) -> int | None:
        return None

    def own_tls_url(self) -> str | None:
        return None

    def tls_stale(self) -> str | None:
        return None

    def tls_served(self) -> bool:
        return False

    async def tls_healthy(self, timeout: float = 5.0) -> tuple[bool, str]:
        return True, ""

    # -- .brokers/env and health

    def extra_env(self) -> list[str]:
        """The superuser's URL, for tests that make databases of their own."""
        port = self.port()
        if port is None or self.external_url():
            return []
        return [f"MSGBROKER_TEST_POSTGRES_ADMIN_URL={self.admin_url(port)}"]

    async def check(self, url: str) -> None:
        # Before after_ready made the test role and database, only the superuser's work.
        await check_postgres(url if self.external_url() else self.admin_url())

    async def check_tls(self, url: str) -> None:
        raise NotImplementedError("postgres has no TLS listener")
