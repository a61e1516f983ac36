"""Redis that demands credentials: a second redis-server with the default user disabled and
two least-privilege tenants (docs/security.md), beside the open one of redis_server."""

from __future__ import annotations

import hashlib
import shutil

from .common import HOST
from .passwords import kept_passwords
from .processes import spawn
from .redis_server import Redis, check_redis
from .tls import TLS_CA, TLS_CERT, TLS_KEY

TENANTS = ("a", "b")
"""Tenant A and tenant B: users ``tenant-a`` and ``tenant-b`` with key prefixes of the same names."""

# Everything the Redis provider sends (plugins/redis: _clients.py, _transport.py, and the Lua of
# _scripts.py, whose calls Redis checks against the same rules) and nothing more. INFO is left
# out on purpose: the provider takes a refused INFO for "not a cluster node".
TENANT_COMMANDS = (
    "+ping", "+client|setname", "+client|id", "+client|unblock",
    "+evalsha", "+script|load",
    "+xadd", "+xread", "+xreadgroup", "+xack", "+xclaim", "+xpending", "+xrange", "+xrevrange",
    "+xlen", "+xdel", "+xtrim", "+xinfo|groups", "+xgroup|create",
    "+get", "+set", "+del", "+exists", "+pexpire", "+time",
    "+hset", "+hsetnx", "+hget", "+hmget", "+hdel",
    "+zadd", "+zrem", "+zrange", "+zremrangebyscore",
)


def tenant_rule(prefix: str) -> str:
    """The ACL rule of a tenant without its password: its own keys, the provider's commands."""
    return f"resetkeys ~{prefix}:* resetchannels -@all {' '.join(TENANT_COMMANDS)}"


class RedisAuth(Redis):
    name = "redis-auth"
    default_port = 6381
    env_var = "MSGBROKER_TEST_REDIS_AUTH_ADDRESS"
    tls_default_port = 6391
    tls_env_var = "MSGBROKER_TEST_REDIS_AUTH_TLS_ADDRESS"

    def __init__(self) -> None:
        super().__init__()
        self.secrets_file = self.dir / "passwords.json"

    def passwords(self) -> dict[str, str]:
        """{user: password}, made once and kept in .brokers/redis-auth/passwords.json (mode 0600)."""
        return kept_passwords(self.secrets_file, self.users())

    def secrets(self) -> list[str]:
        return list(self.passwords().values()) if self.secrets_file.exists() else []

    @staticmethod
    def users() -> list[str]:
        return ["admin", *(f"tenant-{t}" for t in TENANTS)]

    def user_url(self, user: str, port: int | None = None) -> str:
        port = port or self.port()
        return f"redis://{user}:{self.passwords()[user]}@{HOST}:{port}"

    def launch(self, port: int, tls_port: int) -> int:
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        hashed = {u: hashlib.sha256(p.encode()).hexdigest() for u, p in self.passwords().items()}
        acl = self.dir / "users.acl"
        acl.write_text(
            # Off: no client can log in as default. Its permissions stay whole because Redis
            # replays the append-only file as the default user and, before redis/redis#14545,
            # checks a MULTI/EXEC's commands (a script's effects) against them: with -@all every
            # write of a script would be dropped at restart (seen on 7.0.15).
            "user default off nopass ~* &* +@all\n"
            f"user admin on #{hashed['admin']} ~* &* +@all\n"
            + "".join(f"user tenant-{t} on #{hashed[f'tenant-{t}']} {tenant_rule(f'tenant-{t}')}\n"
                      for t in TENANTS)
        )
        conf = self.dir / "redis.conf"
        conf.write_text(
            "# written by scripts/brokers; rewritten at every start (users in users.acl)\n"
            f"bind {HOST}\n"
            f"port {port}\n"
            "protected-mode yes\n"
            "daemonize no\n"
            'logfile ""\n'
            f"dir {data}\n"
            f"aclfile {acl}\n"
            "appendonly yes\n"
            "appendfsync everysec\n"
            f"tls-port {tls_port}\n"
            f"tls-cert-file {TLS_CERT}\n"
            f"tls-key-file {TLS_KEY}\n"
            f"tls-ca-cert-file {TLS_CA}\n"
            "tls-auth-clients no\n"
        )
        return spawn([shutil.which("redis-server") or "redis-server", str(conf)], self.log)

    def extra_env(self) -> list[str]:
        """The tenants' URLs (with their passwords) and prefixes, and the admin's URL."""
        port = self.port()
        if port is None or self.external_url():
            return []
        lines = [f"MSGBROKER_TEST_REDIS_AUTH_ADMIN_URL={self.user_url('admin', port)}"]
        for t in TENANTS:
            up = t.upper()
            lines.append(f"MSGBROKER_TEST_REDIS_AUTH_URL_{up}={self.user_url(f'tenant-{t}', port)}")
            lines.append(f"MSGBROKER_TEST_REDIS_AUTH_PREFIX_{up}=tenant-{t}")
        return lines

    def _as_admin(self, url: str) -> str:
        if "@" in url:
            return url
        scheme, _, rest = url.partition("://")
        return f"{scheme}://admin:{self.passwords()['admin']}@{rest}"

    async def check(self, url: str) -> None:
        await check_redis(self._as_admin(url))

    async def check_tls(self, url: str) -> None:
        await check_redis(self._as_admin(url), tls=True)
