"""What every module shares: where things live, the loopback host, how failures are told."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / ".brokers"
CACHE_ROOT = ROOT / ".cache"
HOST = "127.0.0.1"


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
