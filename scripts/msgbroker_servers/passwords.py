"""Passwords the scripts make for test users, kept in a file only the owner may read."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def kept_passwords(path: Path, users: list[str], make: Callable[[], str] | None = None) -> dict[str, str]:
    """{user: password}: those in ``path`` when it has one for every user, else new random ones
    (``make()``, by default 24 random bytes, URL-safe) written there (mode 0600, replaced in one step)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        found = json.loads(path.read_text())
        if isinstance(found, dict) and all(isinstance(found.get(u), str) for u in users):
            return {u: str(found[u]) for u in users}
    made = {u: make() if make else secrets.token_urlsafe(24) for u in users}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(made, f)
    tmp.replace(path)
    return made
