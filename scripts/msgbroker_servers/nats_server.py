"""NATS with JetStream: a current nats-server built from its Go module (Debian's 2.9.10 with
``MSGBROKER_BROKERS_NATS_VERSION=debian``), plus a second small one, Debian's, that requires TLS."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from .broker import Broker
from .common import CACHE_ROOT, HOST, Failure, rel, say
from .processes import Tracked, spawn
from .tls import TLS_CERT, TLS_KEY, ca_fingerprint, tls_client_context

NATS_VERSION = os.environ.get("MSGBROKER_BROKERS_NATS_VERSION", "v2.15.3")
"""The main server's nats-server: a Go module version, or ``debian`` for the Debian package."""
NATS_MODULE = "github.com/nats-io/nats-server/v2"
BUILD_DIR = CACHE_ROOT / "nats-server"


def built_nats_server(version: str) -> Path:
    """Where the build of ``version`` lives (made by :func:`build_nats_server`)."""
    return BUILD_DIR / version / "nats-server"


def build_nats_server(version: str, who: str) -> Path:
    """Build nats-server ``version`` from its Go module with the machine's Go toolchain into
    .cache/nats-server/<version>/ (once; about 40 s) and return the binary."""
    binary = built_nats_server(version)
    if os.access(binary, os.X_OK):
        return binary
    go = shutil.which("go")
    if not go:
        raise Failure(f"{who}: building nats-server {version} needs Go (the `go` command); install a Go toolchain "
                      "first (or MSGBROKER_BROKERS_NATS_VERSION=debian for the Debian package)")
    t0 = time.monotonic()
    tmp = BUILD_DIR / f"{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    say(f"{who}: building nats-server {version} with `go install {NATS_MODULE}@{version}` "
        f"into {rel(BUILD_DIR / version)} (once; about 40 s)")
    env = dict(os.environ, GOBIN=str(tmp), GOTOOLCHAIN="local", CGO_ENABLED="0")
    res = subprocess.run([go, "install", f"{NATS_MODULE}@{version}"], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0 or not os.access(tmp / "nats-server", os.X_OK):
        (BUILD_DIR / "build.log").write_text(res.stdout + res.stderr)
        raise Failure(f"{who}: `go install {NATS_MODULE}@{version}` failed "
                      f"(exit {res.returncode}); see {rel(BUILD_DIR / 'build.log')}")
    shutil.rmtree(BUILD_DIR / version, ignore_errors=True)
    tmp.rename(BUILD_DIR / version)
    say(f"{who}: built nats-server {version} in {time.monotonic() - t0:.0f}s")
    return binary


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
        return [] if shutil.which("nats-server") else ["nats-server"]  # the TLS server's (and nats-auth's)

    def install_other(self) -> None:
        if NATS_VERSION != "debian":
            build_nats_server(NATS_VERSION, "nats")

    def binary(self) -> str:
        if NATS_VERSION == "debian":
            return shutil.which("nats-server") or "nats-server"
        return str(build_nats_server(NATS_VERSION, "nats"))

    @property
    def version_file(self) -> Path:
        return self.dir / "version"  # the nats-server the running server was started as

    def config_stale(self) -> str | None:
        if self.port() is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            if self.version_file.read_text().strip() == NATS_VERSION:
                return None
        return f"it is not nats-server {NATS_VERSION}"

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
            self.binary(),
            "-a", HOST, "-p", str(port), "-n", "msgbroker-nats",
            "-js", "-sd", str(store),
        ]
        pid = spawn(argv, self.log)
        self.version_file.write_text(NATS_VERSION + "\n")
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
