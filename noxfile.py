"""One session per job of this repository, for `nox -l` / `nox -s NAME`.

The README's two commands stay the entry points (`scripts/test` runs all of this and the
cluster tests); the sessions run single jobs in the repository's own `.venv` (built by
`scripts/bootstrap`, versions pinned by constraints.txt), so they need no download and
agree with the test command. Sessions that talk to brokers start them with
`scripts/brokers up` and read `.brokers/env`.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
PROVIDERS = ("redis", "nats", "rabbitmq", "kafka")
DISTRIBUTIONS = {
    "core": "core",
    "conformance": "conformance",
    "sqlite": "examples/sqlite-provider",
    **{name: f"plugins/{name}" for name in PROVIDERS},
    "outbox": "plugins/outbox",
}
SERVERLESS = ("core", "conformance", "sqlite")

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]


def _bootstrap(session: nox.Session) -> None:
    session.run(str(ROOT / "scripts" / "bootstrap"), external=True)


def _brokers(session: nox.Session, *names: str) -> dict[str, str]:
    """Start (or reuse) the named servers and return their ``MSGBROKER_*`` settings."""
    session.run(str(ROOT / "scripts" / "brokers"), "up", *names, external=True, silent=True)
    env: dict[str, str] = {}
    for line in (ROOT / ".brokers" / "env").read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("MSGBROKER_"):
            env[key] = value
    return env


def _pytest(session: nox.Session, *args: str, env: dict[str, str] | None = None) -> None:
    session.run(PYTHON, "-m", "pytest", "-m", "not cluster", *args, *session.posargs, env=env or {},
                external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the repository and mypy --strict over every distribution."""
    session.run(str(ROOT / "scripts" / "lint"), external=True)


@nox.session
@nox.parametrize("dist", list(DISTRIBUTIONS))
def tests(session: nox.Session, dist: str) -> None:
    """One distribution's own tests (with its provider's server where it has one)."""
    _bootstrap(session)
    path = DISTRIBUTIONS[dist]
    if dist == "outbox":  # PostgreSQL, and every broker for its fault scenarios
        env = _brokers(session, "postgres", *PROVIDERS)
    else:
        env = {} if dist in SERVERLESS else _brokers(session, dist)
    if dist == "core":  # the CLI's provider sessions use every server; the dashboard's tests a browser
        env = _brokers(session)
        session.run(str(ROOT / "scripts" / "brokers"), "browser", external=True, silent=True)
    _pytest(session, f"{path}/tests", env=env)


@nox.session
@nox.parametrize("provider", ["memory", "sqlite", *PROVIDERS])
def conformance(session: nox.Session, provider: str) -> None:
    """The contract suite against one provider (its conformance cases and state machine)."""
    _bootstrap(session)
    if provider == "memory":
        _pytest(session, "conformance/tests/test_memory_conformance.py")
    elif provider == "sqlite":
        _pytest(session, "examples/sqlite-provider/tests/test_conformance.py")
    else:
        _pytest(session, f"plugins/{provider}/tests/test_conformance.py", env=_brokers(session, provider))


@nox.session
def repository(session: nox.Session) -> None:
    """The repository-wide tests: layering, the broker script, faults, security."""
    _bootstrap(session)
    _pytest(session, "tests", env=_brokers(session))


@nox.session
def clusters(session: nox.Session) -> None:
    """The tests marked ``cluster`` against the 3-node clusters (started, then stopped)."""
    _bootstrap(session)
    env = _brokers(session)
    session.run(str(ROOT / "scripts" / "brokers"), "cluster", "up", external=True, silent=True)
    try:
        for line in (ROOT / ".brokers" / "cluster.env").read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("MSGBROKER_"):
                env[key] = value
        session.run(PYTHON, "-m", "pytest", "-m", "cluster", *session.posargs, env=env, external=True)
    finally:
        session.run(str(ROOT / "scripts" / "brokers"), "cluster", "down", external=True, silent=True)


@nox.session
def wheels(session: nox.Session) -> None:
    """Build a wheel of every distribution into dist/ (scripts/wheels), then install them into a
    new venv and run the command there (tests/distributions)."""
    session.run(str(ROOT / "scripts" / "wheels"), external=True)
    _pytest(session, "tests/distributions")
