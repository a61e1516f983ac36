"""NATS that demands credentials: a third nats-server (Debian's, as the open one) with an account
per tenant, each with JetStream and a least-privilege user limited to the subjects the NATS
provider uses for its stream prefix (docs/security.md) — one that logs in with a password and one
with an NKey, the same permissions — plus an unrestricted admin per account for the tests'
clean-up. No TLS listener (the open server's TLS server covers TLS)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

from .broker import Broker
from .common import HOST
from .nats_server import check_nats
from .passwords import kept_passwords
from .processes import spawn

TENANTS = ("a", "b")
"""Tenant A and tenant B: accounts ``TENANT_A``/``TENANT_B``, users ``tenant-a``/``tenant-b`` with
stream prefixes of the same names, and admins ``admin-a``/``admin-b``."""

# Every subject the NATS provider publishes to (plugins/nats/src/msgbroker_nats: _transport.py,
# _consumer.py and the nats-py calls they make) for the stream prefix {p}, and nothing more.
# A stream's name (<prefix>_<topic>) is one subject token, and NATS wildcards match whole tokens:
# the JetStream API verbs cannot be narrowed to the prefix's streams. The account is the boundary.
TENANT_PUBLISH = (
    "{p}.>",                                  # the topics' subjects: <prefix>.<topic>.<partition>
    "$KV.{p}_pins.>",                         # membership and incarnations (KV bucket <prefix>_pins)
    "$KV.{p}_attempts.>",                     # failed attempts, lane owners, leases (<prefix>_attempts)
    "$JS.API.INFO",                           # the account's JetStream, checked at connect
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.CREATE.*",
    "$JS.API.STREAM.UPDATE.*",
    "$JS.API.STREAM.MSG.GET.*",               # peek
    "$JS.API.STREAM.MSG.DELETE.*",            # remove_dead_letters
    "$JS.API.STREAM.PURGE.KV_{p}_pins",       # a member leaving
    "$JS.API.DIRECT.GET.KV_{p}_pins.>",       # KV reads
    "$JS.API.DIRECT.GET.KV_{p}_attempts.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.*.*",    # a lane's durable consumer
    "$JS.API.CONSUMER.CREATE.*.*.{p}.>",      # the dead-letter listing's consumer (name, filter)
    "$JS.API.CONSUMER.INFO.*.*",
    "$JS.API.CONSUMER.LIST.*",                # a subscribe lists the stream's consumers first
    "$JS.API.CONSUMER.DELETE.*.*",
    "$JS.API.CONSUMER.MSG.NEXT.*.*",          # pull requests
    "$JS.ACK.>",                              # acks, naks, in-progress, terminations
    "_MSGBROKER_NATS.>",                      # the group's announcements (_consumer._REWOUND)
)
TENANT_SUBSCRIBE = (
    "_INBOX.>",                               # replies, publish acks, pulled messages
    "_MSGBROKER_NATS.>",
)


def tenant_permissions(prefix: str) -> dict[str, list[str]]:
    """The subjects a tenant with stream prefix ``prefix`` may publish and subscribe to."""
    return {"publish": [s.replace("{p}", prefix) for s in TENANT_PUBLISH],
            "subscribe": [s.replace("{p}", prefix) for s in TENANT_SUBSCRIBE]}


def new_user_seed() -> str:
    """A new NKey user seed (``SU...``), from 32 random bytes."""
    import nkeys  # type: ignore[import-untyped]

    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())


def public_key(seed: str) -> str:
    """The public key (``U...``) of an NKey user seed: what the server's config names."""
    import nkeys

    pair = nkeys.from_seed(bytearray(seed.encode()))
    try:
        return str(pair.public_key.decode())
    finally:
        pair.wipe()


def _quoted(items: list[str]) -> str:
    return ", ".join(json.dumps(s) for s in items)


def permissions_block(prefix: str) -> str:
    """The ``permissions`` value of a tenant's user in nats-server's config syntax."""
    perms = tenant_permissions(prefix)
    return (f"{{ publish: {{ allow: [{_quoted(perms['publish'])}] }}, "
            f"subscribe: {{ allow: [{_quoted(perms['subscribe'])}] }} }}")


class NatsAuth(Broker):
    name = "nats-auth"
    default_port = 4224
    env_var = "MSGBROKER_TEST_NATS_AUTH_ADDRESS"
    tls_default_port = 0
    tls_env_var = "MSGBROKER_TEST_NATS_AUTH_TLS_URL"  # never written: this server has no TLS listener
    serves_tls = False
    start_timeout = 20.0

    def __init__(self) -> None:
        super().__init__()
        self.secrets_file = self.dir / "passwords.json"
        self.seeds_file = self.dir / "nkeys.json"
        self.conf = self.dir / "nats-auth.conf"
        self.started_with = self.dir / "config.sha256"
        """The digest of the config launch() wrote for the running server (see config_stale)."""

    # -- credentials

    @staticmethod
    def users() -> list[str]:
        return [f"{role}-{t}" for t in TENANTS for role in ("tenant", "admin")]

    def passwords(self) -> dict[str, str]:
        """{user: password}, made once and kept in .brokers/nats-auth/passwords.json (mode 0600)."""
        return kept_passwords(self.secrets_file, self.users())

    def seeds(self) -> dict[str, str]:
        """{tenant-a: seed, tenant-b: seed} of the tenants' NKey users, made once and kept in
        .brokers/nats-auth/nkeys.json (mode 0600)."""
        return kept_passwords(self.seeds_file, [f"tenant-{t}" for t in TENANTS], make=new_user_seed)

    def seed_file(self, tenant: str) -> os.PathLike[str]:
        """The tenant's seed alone in a file (mode 0600), for nats.nkeys_seed_file."""
        return self.dir / f"{tenant}.nk"

    def secrets(self) -> list[str]:
        found = list(self.passwords().values()) if self.secrets_file.exists() else []
        return found + (list(self.seeds().values()) if self.seeds_file.exists() else [])

    def user_url(self, user: str, port: int | None = None) -> str:
        return f"nats://{user}:{self.passwords()[user]}@{HOST}:{port or self.port()}"

    def _write_private(self, path: os.PathLike[str], text: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = f"{os.fspath(path)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    # -- the server

    def url(self, port: int) -> str:
        return f"nats://{HOST}:{port}"

    def tls_url(self, port: int) -> str:
        return ""

    def missing_packages(self) -> list[str]:
        return [] if shutil.which("nats-server") else ["nats-server"]

    def config_text(self, port: int) -> str:
        """The whole config: one account per tenant with JetStream, its admin and its tenant."""
        store = self.dir / "jetstream"
        passwords = self.passwords()
        seeds = self.seeds()
        accounts = "".join(
            f"  TENANT_{t.upper()}: {{\n"
            "    jetstream: enabled\n"
            "    users: [\n"
            f"      {{ user: \"admin-{t}\", password: {json.dumps(passwords[f'admin-{t}'])} }}\n"
            # One line per user: the tests take a permission away by editing this line (reload).
            f"      {{ user: \"tenant-{t}\", password: {json.dumps(passwords[f'tenant-{t}'])}, "
            f"permissions: {permissions_block(f'tenant-{t}')} }}\n"
            # the same tenant's NKey user: same stream prefix, same permissions
            f"      {{ nkey: {json.dumps(public_key(seeds[f'tenant-{t}']))}, "
            f"permissions: {permissions_block(f'tenant-{t}')} }}\n"
            "    ]\n"
            "  }\n"
            for t in TENANTS
        )
        return (
            "# written by scripts/brokers; rewritten at every start (docs/security.md, NATS)\n"
            "server_name: msgbroker-nats-auth\n"
            f"listen: {HOST}:{port}\n"
            f'jetstream {{\n  store_dir: "{store}"\n  max_memory_store: 256MB\n  max_file_store: 1GB\n}}\n'
            f"accounts {{\n{accounts}}}\n"
        )

    def launch(self, port: int, tls_port: int) -> int:
        (self.dir / "jetstream").mkdir(parents=True, exist_ok=True)
        text = self.config_text(port)
        self._write_private(self.conf, text)
        for tenant, seed in self.seeds().items():
            self._write_private(self.seed_file(tenant), seed + "\n")
        pid = spawn([shutil.which("nats-server") or "nats-server", "-c", str(self.conf)], self.log)
        self.started_with.write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")
        return pid

    def config_stale(self) -> str | None:
        """The running server was started with another config than launch() writes now (no NKey
        users: an older scripts/brokers; other passwords or seeds). The tests' own edits of the
        config file (permissions taken away and given back) are not compared: the digest is of
        what launch() wrote."""
        port = self.port()
        if port is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            if self.started_with.read_text().strip() == hashlib.sha256(self.config_text(port).encode()).hexdigest():
                return None
        return "its config is not the one scripts/brokers writes now (its NKey users are new)"

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
        """The tenants' URLs (with their passwords) and prefixes, and each account's admin."""
        port = self.port()
        if port is None or self.external_url():
            return []
        lines: list[str] = []
        for t in TENANTS:
            up = t.upper()
            lines.append(f"MSGBROKER_TEST_NATS_AUTH_URL_{up}={self.user_url(f'tenant-{t}', port)}")
            lines.append(f"MSGBROKER_TEST_NATS_AUTH_PREFIX_{up}=tenant-{t}")
            lines.append(f"MSGBROKER_TEST_NATS_AUTH_ADMIN_URL_{up}={self.user_url(f'admin-{t}', port)}")
            lines.append(f"MSGBROKER_TEST_NATS_AUTH_NKEY_{up}={public_key(self.seeds()[f'tenant-{t}'])}")
            lines.append(f"MSGBROKER_TEST_NATS_AUTH_NKEY_SEED_FILE_{up}={self.seed_file(f'tenant-{t}')}")
        return lines

    def _as_admin(self, url: str) -> str:
        if "@" in url:
            return url
        scheme, _, rest = url.partition("://")
        return f"{scheme}://admin-a:{self.passwords()['admin-a']}@{rest}"

    async def check(self, url: str) -> None:
        await check_nats(self._as_admin(url))

    async def check_tls(self, url: str) -> None:
        raise NotImplementedError("nats-auth has no TLS listener")
