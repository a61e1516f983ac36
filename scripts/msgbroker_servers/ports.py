"""Ports: the standard one when free, else the next free one; remembered in a file so that a
server comes back on the same port after restart or kill -9."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

from .common import HOST, RUN_DIR, Failure, say

# Where port files live: .brokers/<name>/*port for the single servers and
# .brokers/cluster/<name>/<node>/*port (plus .brokers/cluster/<name>/*port) for the clusters.
PORT_FILE_PATTERNS = ("*/*port", "cluster/*/*port", "cluster/*/*/*port")


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
    for pattern in PORT_FILE_PATTERNS:
        for f in RUN_DIR.glob(pattern):
            if f == key_file:
                continue
            with contextlib.suppress(ValueError, OSError):
                taken.add(int(f.read_text().strip()))
    return taken


def choose_port(owner: str, key_file: Path, default: int, patience: float = 1.0) -> int:
    """The port remembered in key_file if it is (or soon becomes) free, else the standard
    port if free, else the next free one; remembered in key_file."""
    others = ports_remembered_elsewhere(key_file)
    remembered = read_port(key_file)
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


def wait_port_free(port: int, timeout: float) -> bool:
    """True once nothing listens on port (an old process may take a moment to let go)."""
    deadline = time.monotonic() + timeout
    while not port_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
