"""Redis: one redis-server with AOF and RDB, plain and TLS on the same process."""

from __future__ import annotations

import shutil

from .broker import Broker
from .common import HOST, Failure
from .processes import spawn
from .tls import TLS_CA, TLS_CERT, TLS_KEY


async def check_redis(url: str, tls: bool = False) -> None:
    import redis.asyncio as aioredis

    options: dict[str, object] = {"ssl_ca_certs": str(TLS_CA)} if tls else {}
    client = aioredis.from_url(url, socket_connect_timeout=2, socket_timeout=3, **options)
    try:
        if not await client.ping():
            raise Failure("PING did not answer PONG")
    finally:
        await client.aclose()


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
