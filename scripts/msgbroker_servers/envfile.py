"""`.brokers/env`: the MSGBROKER_* settings of the servers that are up."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .broker import Broker
from .common import RUN_DIR
from .tls import TLS_CA, TLS_CA_ENV

ENV_FILE = RUN_DIR / "env"


def env_lines(brokers: list[Broker]) -> list[str]:
    """MSGBROKER_* lines of the servers that are up (ours or the user's): the plain address,
    the TLS one, and the test CA when a TLS listener of ours is among them."""
    lines: list[str] = []
    ours_tls = False
    for b in brokers:
        url = b.external_url() or (b.own_url() if b.proc.pid() is not None else None)
        if url:
            lines.append(b.env_line(url))
            if b.proc.pid() is not None:
                lines.extend(b.extra_env())
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
def addresses_as_up_left_them(brokers: list[Broker]) -> Iterator[None]:
    """Take the MSGBROKER_* addresses from .brokers/env instead of the caller's environment.

    `restart`, `kill`, `pause`, `resume` and `down` act on our own servers only. A test run whose
    shell names other servers (another checkout's) calls them too, and the file must not end up
    naming those servers for everybody who loads it next."""
    names = {TLS_CA_ENV} | {v for b in brokers for v in (b.env_var, b.tls_env_var)}
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


def write_env_file(brokers: list[Broker]) -> None:
    """Write .brokers/env anew from all servers (pass every one, not just those acted on)."""
    lines = env_lines(brokers)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = ENV_FILE.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(ENV_FILE)
